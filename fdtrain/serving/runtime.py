"""An exported ONNX model scored through ONNX Runtime. Never imports torch: a serving host needs
only the `onnx` extra (onnxruntime, numpy, pillow, av, dlib-bin, pyyaml)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fdtrain import FdtrainError


class ServingError(FdtrainError):
    """An exported model that cannot be served: the message names the file."""


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (written by `fdtrain export`)."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (auto: CUDA when onnxruntime-gpu has it)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device in ("auto", "cuda") or device.startswith("cuda"):
        if "CUDAExecutionProvider" in have:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device != "auto":
            raise ServingError(f"--device {device}: this onnxruntime has no CUDA provider (has {have}); "
                             "install onnxruntime-gpu")
    return ["CPUExecutionProvider"]


def make_session(path: str | os.PathLike, device: str = "auto", threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():  # respect the same knob the torch path does
        opts.intra_op_num_threads = int(os.environ["OMP_NUM_THREADS"])
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))


class OnnxModel:
    """``OnnxModel(path)(batch)`` -> logits (N,) float32 for a (N, 3, S, S) float32 batch."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int = 0):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX model file")
        side = sidecar_path(path)
        if not side.is_file():
            raise FileNotFoundError(f"{side}: the sidecar `fdtrain export` writes beside {path.name} is missing "
                                    "(it holds the input size and normalisation)")
        try:
            self.meta: dict[str, Any] = json.loads(side.read_text())
            self.input_size = int(self.meta["input_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ServingError(f"{side}: not a sidecar written by `fdtrain export` ({type(e).__name__}: {e})") from e
        if self.meta.get("format") != "onnx":
            raise ServingError(f"{side}: describes a {self.meta.get('format')!r} export, not an ONNX one")
        try:
            self.session = make_session(path, device, threads)
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            if isinstance(e, FdtrainError):
                raise
            raise ServingError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from e
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["logit"], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
