"""`fdtrain predict --model FILE.onnx`: the same scores as the PyTorch path, without torch."""
import json
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from tests import _data_utils as D
from tests import _engine_utils as U

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Runs the CLI in a fresh interpreter where `import torch` (and so timm, torchvision) fails.
NO_TORCH = ("import sys; sys.modules['torch'] = None; from fdtrain.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torchvision' not in sys.modules and 'timm' not in sys.modules; sys.exit(rc)")


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return U.run([sys.executable, "-c", NO_TORCH, *args], timeout=300)


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    """The shared short training run (a model whose scores move with the input), exported to ONNX;
    face crops from its test shards, some resized away from the model's 64 px, and a face video."""
    from fdtrain.serving.export import export

    data, run_dir, proc = trained_run
    assert proc.returncode == 0, U.explain(proc)
    root = tmp_path_factory.mktemp("served")
    export(run_dir, "onnx", root / "m.onnx")
    inputs = []
    with tarfile.open(data / "test" / "shard-000000.tar") as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:4]
        for i, m in enumerate(jpgs):
            img = Image.open(tar.extractfile(m)).convert("RGB")
            if i % 2:  # through the resize too (64 px is the model's input size)
                img = img.resize((90 + 10 * i, 90 + 10 * i), Image.BICUBIC)
            inputs.append(root / f"crop{i}.png")
            img.save(inputs[-1])
    inputs.append(D.write_video(root / "face.mp4", D.face_frames(5, size=160)))
    return root, run_dir, inputs


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_onnx_predict_matches_pytorch_predict_without_torch(served):
    from fdtrain.engine.predict import PredictOptions, predict_paths

    root, run_dir, inputs = served
    torch_recs = list(predict_paths(run_dir, [str(p) for p in inputs], PredictOptions(frames=3)))
    proc = run_without_torch("predict", "--model", str(root / "m.onnx"), "--frames", "3", *map(str, inputs))
    assert proc.returncode == 0, U.explain(proc)
    onnx_recs = _records(proc.stdout)
    assert [r["path"] for r in onnx_recs] == [r["path"] for r in torch_recs] == [str(p) for p in inputs]
    for t, o in zip(torch_recs, onnx_recs):
        assert o.keys() == t.keys() and o["kind"] == t["kind"] and o["label"] == t["label"]
        assert o["score"] == pytest.approx(t["score"], abs=1e-6)
    video_t, video_o = torch_recs[-1], onnx_recs[-1]
    assert video_o["kind"] == "video" and video_o["faces"] == 3 and video_o["frame_scores"].keys() == \
        video_t["frame_scores"].keys()
    for k, v in video_t["frame_scores"].items():
        assert video_o["frame_scores"][k] == pytest.approx(v, abs=1e-6)
    scores = [r["score"] for r in torch_recs]
    assert max(scores) - min(scores) > 1e-3  # distinct inputs score differently: no constant passes


def test_onnx_predict_errors_name_the_file(served, tmp_path):
    root, run_dir, inputs = served
    img = str(inputs[0])
    proc = run_without_torch("predict", "--model", str(tmp_path / "none.onnx"), img)
    assert proc.returncode == 2 and "none.onnx" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "lonely.onnx").write_bytes((root / "m.onnx").read_bytes())
    proc = run_without_torch("predict", "--model", str(tmp_path / "lonely.onnx"), img)
    assert proc.returncode == 2 and "lonely.onnx.json" in proc.stderr and "sidecar" in proc.stderr
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    (tmp_path / "junk.onnx.json").write_text((root / "m.onnx.json").read_text())
    proc = run_without_torch("predict", "--model", str(tmp_path / "junk.onnx"), img)
    assert proc.returncode == 2 and "junk.onnx" in proc.stderr and "ONNX Runtime cannot load" in proc.stderr
    proc = run_without_torch("predict", "--model", str(run_dir), img)
    assert proc.returncode == 2 and "expected an .onnx file" in proc.stderr
