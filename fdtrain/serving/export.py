"""`fdtrain export`: a trained model as an ONNX or TorchScript inference graph, checked against PyTorch.

The graph takes a normalised image batch (N, 3, S, S) float32 in [-1, 1] (fdtrain.serving.preprocess)
and returns the logit (N,) (score = sigmoid(logit)); with ``with_reconstructions`` also the real and
fake reconstructions (N, 3, S, S). The batch axis is dynamic; the side S is fixed.

ONNX: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) at opset 17 by
default. Both exporters of torch 2.14 give graphs that match here; the TorchScript-based one needs no
onnxscript and took ~2 s instead of ~10 s for a 64-px FakeDiffer on this 2-core CPU, and opset 17
runs on ONNX Runtime >= 1.13 and TensorRT >= 8.6 (ONNX Runtime 1.32 was used to check it).
``dynamo=True`` selects torch.export-based export (needs onnxscript). TorchScript: ``torch.jit.trace``.

Before it returns, the export runs the saved file and the PyTorch model on the same random batches
of two sizes (neither the size it was traced with) and fails if any output differs by more than
``atol + rtol * |pytorch|``. A JSON sidecar (``<out>.json``) records the input size, the
normalisation, the outputs, the model config and the checkpoint's sha256.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fdtrain import FdtrainError
from fdtrain.fingerprint import sha256_file

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)
ATOL = RTOL = 1e-4  # fp32 on both sides; a correct graph differs by ~1e-6 (reordered sums)


class ExportError(FdtrainError):
    """An export that cannot be made or did not match; the message says which input or output."""


class InferenceGraph(nn.Module):
    """What is exported: the model's inference forward, optionally with both reconstructions."""

    def __init__(self, model: nn.Module, with_reconstructions: bool):
        super().__init__()
        self.model, self.with_reconstructions = model, with_reconstructions

    def forward(self, image: torch.Tensor):
        if self.with_reconstructions:
            return self.model.forward_with_reconstructions(image)
        return self.model(image)


def output_names(with_reconstructions: bool) -> list[str]:
    return ["logit", "recon_real", "recon_fake"] if with_reconstructions else ["logit"]


def _outputs(y) -> list[np.ndarray]:
    ys = y if isinstance(y, (tuple, list)) else (y,)
    return [t.detach().float().cpu().numpy() for t in ys]


def load_for_export(checkpoint: str | os.PathLike) -> tuple[nn.Module, Any, Path]:
    """(model in eval mode, its Config, the model.pt file); clear errors for paths that hold no model."""
    from fdtrain.inference import load_model
    from fdtrain.model_file import resolve_model_file

    model_file = resolve_model_file(checkpoint)  # FileNotFoundError names the path
    try:
        model, cfg = load_model(model_file)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load and the config reader fail in many ways on a foreign file
        raise ExportError(f"{model_file}: not a loadable fdtrain model file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return model, cfg, model_file


def _check_size(model: nn.Module, cfg, size: int) -> None:
    import dataclasses

    try:  # the model section's own rule for model.input_size
        dataclasses.replace(cfg.model, input_size=size).validate()
    except ValueError as e:
        raise ExportError(f"--input-size {size}: {e} (the model was trained at {cfg.model.input_size} px)") from e
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except RuntimeError as e:
        raise ExportError(f"--input-size {size}: the model cannot run at this size "
                          f"({str(e).splitlines()[0]})") from e


def _export_onnx(graph: InferenceGraph, example: torch.Tensor, out: Path, opset: int, dynamo: bool) -> None:
    names = output_names(graph.with_reconstructions)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        prog = torch.onnx.export(graph, (example,), None, input_names=["image"], output_names=names,
                                 opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
        prog.save(str(out))
        return
    import warnings

    with warnings.catch_warnings():
        # torch 2.9+ warns that this exporter is the legacy one; it is the one chosen (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, (example,), str(out), input_names=["image"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["image", *names]}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def _run_onnx(path: Path, x: np.ndarray) -> list[np.ndarray]:
    from fdtrain.serving.runtime import make_session

    sess = make_session(path, device="cpu")
    return sess.run(None, {"image": x})


def _run_torchscript(path: Path, x: np.ndarray) -> list[np.ndarray]:
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return _outputs(loaded(torch.from_numpy(x)))


def verify(graph: InferenceGraph, path: Path, fmt: str, size: int, *, atol: float = ATOL, rtol: float = RTOL,
           seed: int = 0) -> list[dict[str, Any]]:
    """Run the saved file and ``graph`` on the same random batches; ExportError past the tolerance."""
    rng = np.random.default_rng(seed)
    names = output_names(graph.with_reconstructions)
    checks = []
    for b in CHECK_BATCHES:
        x = rng.uniform(-1.0, 1.0, (b, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            ref = _outputs(graph(torch.from_numpy(x)))
        got = _run_onnx(path, x) if fmt == "onnx" else _run_torchscript(path, x)
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise ExportError(f"{path}: output '{name}' has shape {g.shape} at batch {b}, PyTorch gives {r.shape}")
            diff = np.abs(g.astype(np.float64) - r)
            excess = float((diff - (atol + rtol * np.abs(r))).max())
            checks.append({"batch": b, "output": name, "max_abs_diff": float(diff.max())})
            if excess > 0:
                raise ExportError(f"{path}: output '{name}' differs from PyTorch by up to {float(diff.max()):.3g} at "
                                  f"batch {b} (tolerance {atol:g} + {rtol:g}*|value|); the export is not faithful")
    return checks


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, *, input_size: int = 0,
           with_reconstructions: bool = False, opset: int = DEFAULT_OPSET, dynamo: bool = False,
           atol: float = ATOL, rtol: float = RTOL) -> dict[str, Any]:
    """Export, verify, write the sidecar; returns the sidecar dict."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: unknown format; choose one of {list(FORMATS)}")
    model, cfg, model_file = load_for_export(checkpoint)
    size = input_size or cfg.model.input_size
    if with_reconstructions and not hasattr(model, "forward_with_reconstructions"):
        raise ExportError(f"--with-reconstructions: the '{cfg.model.variant}' variant has no decoders "
                          "(only fakediffer and dual_recons reconstruct)")
    _check_size(model, cfg, size)
    graph = InferenceGraph(model, with_reconstructions).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(TRACE_BATCH, 3, size, size)
    tmp = out.with_name(out.name + ".tmp")
    try:
        if fmt == "onnx":
            _export_onnx(graph, example, tmp, opset, dynamo)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(graph, example, check_trace=False)
            torch.jit.save(traced, str(tmp))
        checks = verify(graph, tmp, fmt, size, atol=atol, rtol=rtol)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    from fdtrain import __version__
    from fdtrain.serving.preprocess import normalization
    from fdtrain.serving.runtime import sidecar_path

    names = output_names(with_reconstructions)
    sidecar = {
        "format": fmt,
        "file": out.name,
        "fdtrain_version": __version__,
        "torch_version": torch.__version__,
        "exporter": {"onnx": "torch.onnx " + ("dynamo" if dynamo else "torchscript")}.get(fmt, "torch.jit.trace"),
        "opset": opset if fmt == "onnx" else None,
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "range": [-1.0, 1.0]},
        "outputs": [{"name": n, "shape": ["batch"] if n == "logit" else ["batch", 3, size, size]} for n in names],
        "score": "sigmoid(logit); label fake when score > threshold",
        "threshold": cfg.eval.threshold,
        "input_size": size,
        "trained_input_size": cfg.model.input_size,
        "normalization": normalization(),
        "model": dataclasses.asdict(cfg.model),
        "checkpoint": {"path": str(model_file), "sha256": sha256_file(model_file)},
        "verified": {"atol": atol, "rtol": rtol, "checks": checks},
    }
    Path(sidecar_path(out)).write_text(json.dumps(sidecar, indent=1))
    return sidecar
