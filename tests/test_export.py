"""`fdtrain export`: ONNX and TorchScript graphs of briefly trained tiny models match PyTorch.

The export checks itself (fdtrain.serving.export.verify); these tests check again, independently:
they load the written file with ONNX Runtime / torch.jit and compare with the eager model in eval
mode on fresh random batches of two sizes, different from the batch the graph was traced with.
"""
import json

import numpy as np
import pytest

from tests._serving_utils import SIZE, train_tiny

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14: torch.jit.* are deprecated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"fakediffer": train_tiny(root / "fd", error_encoder="separate"),
            "xception": train_tiny(root / "xc", variant="xception")}


def _eager(model, x, with_recons=False):
    import torch

    with torch.no_grad():
        y = model.forward_with_reconstructions(torch.from_numpy(x)) if with_recons else (model(torch.from_numpy(x)),)
    return [t.numpy() for t in y]


def _run_file(path, fmt, x):
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"image": x})
    import torch

    with torch.no_grad():
        y = torch.jit.load(str(path))(torch.from_numpy(x))
    return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


CASES = [("fakediffer", "onnx", True), ("fakediffer", "torchscript", False), ("xception", "onnx", False),
         ("xception", "torchscript", False)]


@pytest.mark.parametrize("variant,fmt,recons", CASES, ids=[f"{v}-{f}{'-recons' if r else ''}" for v, f, r in CASES])
def test_export_matches_pytorch_on_two_batch_sizes(tiny, tmp_path, variant, fmt, recons):
    from fdtrain.fingerprint import sha256_file
    from fdtrain.serving.export import export

    out = tmp_path / f"m.{fmt}"
    side = export(tiny[variant], fmt, out, with_reconstructions=recons)
    assert out.is_file() and json.loads((tmp_path / f"m.{fmt}.json").read_text()) == side
    assert side["input_size"] == SIZE and side["normalization"]["mean"] == [0.5] * 3
    assert side["model"]["variant"] == variant and side["checkpoint"]["sha256"] == sha256_file(tiny[variant])
    assert [o["name"] for o in side["outputs"]] == (["logit", "recon_real", "recon_fake"] if recons else ["logit"])
    from fdtrain.inference import load_model

    model, _ = load_model(tiny[variant])
    rng = np.random.default_rng(7)
    for batch in (1, 5):
        x = rng.uniform(-1, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)
        ref, got = _eager(model, x, recons), _run_file(out, fmt, x)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
        assert batch == 1 or ref[0].std() > 0  # the logits are not a constant the graph could have baked in


def test_export_fails_when_the_graph_does_not_match(tiny, tmp_path, monkeypatch):
    """The self-check is real: a graph that drifts from PyTorch is refused and nothing is written."""
    from fdtrain.serving import export as E

    real = E._run_torchscript
    monkeypatch.setattr(E, "_run_torchscript", lambda path, x: [y + 1e-2 for y in real(path, x)])
    with pytest.raises(E.ExportError, match="differs from PyTorch"):
        E.export(tiny["xception"], "torchscript", tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.pt.json").exists()


def test_export_bad_inputs_are_clear_errors(tiny, tmp_path, capsys):
    from fdtrain.cli import main

    def err(*args):
        rc = main(["export", *args])
        return rc, capsys.readouterr().err

    rc, msg = err("--checkpoint", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "a.onnx"))
    assert rc == 2 and "nope" in msg and "no model.pt" in msg
    rc, msg = err("--checkpoint", str(tiny["fakediffer"]), "--format", "tflite", "--out", str(tmp_path / "a"))
    assert rc == 2 and "'tflite'" in msg and "onnx" in msg
    rc, msg = err("--checkpoint", str(tiny["fakediffer"]), "--format", "onnx", "--out", str(tmp_path / "a.onnx"),
                  "--input-size", "16")
    assert rc == 2 and "--input-size 16" in msg and "32" in msg
    rc, msg = err("--checkpoint", str(tiny["xception"]), "--format", "onnx", "--out", str(tmp_path / "a.onnx"),
                  "--with-reconstructions")
    assert rc == 2 and "xception" in msg and "no decoders" in msg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    rc, msg = err("--checkpoint", str(junk), "--format", "torchscript", "--out", str(tmp_path / "a.pt"))
    assert rc == 2 and "junk.pt" in msg and "not a loadable fdtrain model file" in msg
    assert not list(tmp_path.glob("a*"))


def test_dynamo_exporter_matches_too(tiny, tmp_path):
    """--dynamo (torch.export-based, torch's default exporter) gives a graph that passes the same check."""
    from fdtrain.serving.export import export

    side = export(tiny["xception"], "onnx", tmp_path / "d.onnx", dynamo=True, opset=18)
    assert side["exporter"] == "torch.onnx dynamo" and side["opset"] == 18
    assert {c["batch"] for c in side["verified"]["checks"]} == {1, 3}
