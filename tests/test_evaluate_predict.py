"""`fdtrain evaluate` and `fdtrain predict` on a trained tiny model."""
import json
import tarfile

import numpy as np
import pytest

from tests import _engine_utils as U

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(trained_run):
    data, run_dir, proc = trained_run
    assert proc.returncode == 0, U.explain(proc)
    return data, run_dir


def test_evaluate_reproduces_the_runs_final_test_metrics(trained, tmp_path):
    data, run_dir = trained
    out = tmp_path / "eval.json"
    proc = U.run(U.fdtrain_cmd("evaluate", "--checkpoint", str(run_dir), "--data", str(data / "test"),
                               "--out", str(out)))
    assert proc.returncode == 0, U.explain(proc)
    assert "set" in proc.stdout and "frame" in proc.stdout and "video" in proc.stdout  # the table
    report = json.loads(out.read_text())
    assert report["checkpoint"].endswith("model.pt") and "best" not in report["checkpoint"]
    assert U.metrics(run_dir)["evaluated"].startswith(report["checkpoint"].split("/")[-2])
    # the trainer evaluated the same (best) weights on the same shards at the end of the run
    assert report["results"]["test"] == U.metrics(run_dir)["test"]["test"]


def test_evaluate_a_dataset_folder_names_each_split(trained, tmp_path):
    data, run_dir = trained
    out = tmp_path / "all.json"
    proc = U.run(U.fdtrain_cmd("evaluate", "--checkpoint", str(run_dir / "checkpoints" / "best"), "--data",
                               str(data), "--out", str(out), "--backend", "torch", "--batch-size", "5"))
    assert proc.returncode == 0, U.explain(proc)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"train", "val", "test"}
    assert results["train"]["frame"]["n"] == 64 and results["val"]["video"]["n"] == 8
    bad = U.run(U.fdtrain_cmd("evaluate", "--checkpoint", str(run_dir), "--data", str(tmp_path)))
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr


def _scores_by_key(run_dir, data):
    """Per-frame scores of the checkpoint, through the loader (what evaluate uses)."""
    from fdtrain.data import build_loader
    from fdtrain.engine.evaluate import evaluate_loader
    from fdtrain.inference import load_model
    from fdtrain.model_file import resolve_model_file

    model, cfg = load_model(resolve_model_file(run_dir))
    res = evaluate_loader(model, build_loader(cfg, "test", path=str(data / "test")))
    return dict(zip(res.keys, res.scores))


def test_predict_images_scores_match_the_loader_path(trained, tmp_path):
    data, run_dir = trained
    files = {}
    with tarfile.open(data / "test" / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg") and len(files) < 6:
                dest = tmp_path / (m.name.replace("/", "_"))
                dest.write_bytes(tar.extractfile(m).read())
                files[str(dest)] = m.name[: -len(".jpg")]
    out = tmp_path / "pred.jsonl"
    proc = U.run(U.fdtrain_cmd("predict", "--checkpoint", str(run_dir), "--out", str(out), *files))
    assert proc.returncode == 0, U.explain(proc)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in recs] == list(files)
    expected = _scores_by_key(run_dir, data)
    for r in recs:
        assert r["kind"] == "image" and r["label"] in ("real", "fake")
        assert r["score"] == pytest.approx(expected[files[r["path"]]], abs=1e-4)  # PIL vs DALI JPEG decode


def test_predict_video_crops_faces_and_averages_frames(trained, tmp_path):
    from skimage import data as skdata

    from fdtrain.data.prep.video import write_test_video

    _, run_dir = trained
    face = skdata.astronaut()  # 512x512, one frontal face that dlib's HOG detector finds
    write_test_video(tmp_path / "face.mp4", [np.roll(face, 4 * i, axis=1) for i in range(6)])
    rng = np.random.default_rng(0)
    write_test_video(tmp_path / "noface.mp4", [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)] * 3)
    proc = U.run(U.fdtrain_cmd("predict", "--checkpoint", str(run_dir), "--frames", "3",
                               str(tmp_path / "face.mp4"), str(tmp_path / "noface.mp4")))
    assert proc.returncode == 1, U.explain(proc)  # one input could not be scored
    face_rec, noface_rec = (json.loads(line) for line in proc.stdout.splitlines())
    assert face_rec["kind"] == "video" and face_rec["frames_total"] == 6 and face_rec["frames_sampled"] == 3
    assert face_rec["faces"] == 3 and len(face_rec["frame_scores"]) == 3
    assert face_rec["score"] == pytest.approx(np.mean(list(face_rec["frame_scores"].values())), abs=1e-5)
    assert 0.0 <= face_rec["score"] <= 1.0
    assert noface_rec["score"] is None and "no face" in noface_rec["error"]
    assert "could not be scored" in proc.stderr


def test_find_sets_picks_split_folders(tmp_path):
    from fdtrain.engine.evaluate import find_sets

    for split in ("train", "test", "test_NeuralTextures"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "manifest.json").write_text("{}")
    assert list(find_sets(tmp_path)) == ["test", "test_NeuralTextures", "train"]
    assert list(find_sets(tmp_path, "test,test_NeuralTextures")) == ["test", "test_NeuralTextures"]
    assert find_sets(tmp_path / "test", "in_domain") == {"in_domain": tmp_path / "test"}
    with pytest.raises(FileNotFoundError, match="val"):
        find_sets(tmp_path, "test,val")


def test_evaluate_reads_the_model_file_once(trained, monkeypatch):
    """model.pt has one reader (fdtrain.model_file.load_model_file): `fdtrain evaluate` reads
    the weights, config and step from one load."""
    import torch

    from fdtrain.engine.evaluate import evaluate_checkpoint

    data, run_dir = trained
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or real_load(f, *a, **k))
    report = evaluate_checkpoint(run_dir, data / "test", max_batches=1, device="cpu")
    assert [f for f in loads if f.endswith("model.pt")] == [report["checkpoint"]]
    assert report["step"] > 0 and report["results"]["test"]["frame"]["n"] > 0
