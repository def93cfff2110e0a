"""A run's files as read without the engine: ``model.pt`` (its one writer and one reader), the layout
of a ``checkpoints/`` folder (which step folders are complete, which is best), and ``load_file``, the
``torch.load(weights_only=True)`` that every checkpoint read goes through.

Inference, evaluation, export and the engine's checkpointer (fdtrain.engine.checkpoint, which writes
the folders: layout in its docstring) all use these, so serving and inference never import the engine.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdtrain import FdtrainError

MODEL_FORMAT = "fdtrain-model-v1"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with meta.json) as (step, path), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and not p.is_symlink() and (p / "meta.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def newest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def best_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    link = Path(ckpt_dir) / "best"
    return link.resolve() if link.exists() and (link / "model.pt").is_file() else None


def resolve_model_file(path: str | os.PathLike) -> Path:
    """A model.pt from a file, a checkpoint folder, a checkpoints/ folder or a run folder.

    Folders above a checkpoint resolve to its best checkpoint, else to the newest.
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.pt").is_file():
        return path / "model.pt"
    for ckpt_dir in (path, path / "checkpoints"):
        found = best_checkpoint(ckpt_dir) or newest_checkpoint(ckpt_dir)
        if found is not None:
            return found / "model.pt"
    raise FileNotFoundError(
        f"{path}: no model.pt here (expected a model.pt file, a checkpoint folder step-N/, "
        "or a run folder with checkpoints/)")


class CheckpointError(FdtrainError):
    """A checkpoint file that cannot be used: the message names the file and what is wrong."""


def load_file(f: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of one checkpoint file, with a message naming what is wrong.

    weights_only admits tensors and plain Python values only: a file whose unpickling would import
    anything else (``os.system`` in a crafted file, numpy objects in a foreign one) is refused
    before any of it runs. fdtrain writes its own state in those types (see :func:`rng_state`).
    """
    f = Path(f)
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    size = f.stat().st_size
    if size == 0:
        raise CheckpointError(f"{f}: empty file (0 bytes); its write never finished (disk full? killed?)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        if blocked:
            raise CheckpointError(
                f"{f}: refused: unpickling it would import {blocked.group(1)}, which is not a tensor or a plain "
                "value. fdtrain loads checkpoints with torch.load(weights_only=True) and never runs code from "
                "them; this file was not written by fdtrain (crafted, or from another tool)") from None
        raise CheckpointError(f"{f}: not a torch checkpoint ({size} bytes that do not unpickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: unreadable ({size} bytes): truncated or not a torch file ({first})") from None


@dataclass
class ModelFile:
    """The contents of one ``model.pt``: fp32 weights with the plain model's keys and the config
    that rebuilds the model (fdtrain.inference.model_from_file); ``path`` is the file read."""

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def write_model_file(path: str | os.PathLike, *, config: dict, state_dict: dict[str, torch.Tensor], step: int,
                     epoch: int, metrics: dict) -> None:
    """The one writer of ``model.pt`` (checkpoints, and any tool that makes a model file)."""
    torch.save(plain({"format": MODEL_FORMAT, "config": config, "state_dict": state_dict, "step": step,
                      "epoch": epoch, "metrics": metrics}), Path(path))


def load_model_file(path: str | os.PathLike) -> ModelFile:
    """The one reader of ``model.pt``: a file, a checkpoint folder, a checkpoints/ folder or a run
    folder (see :func:`resolve_model_file`), read with ``weights_only`` (tensors and plain values)."""
    f = resolve_model_file(path)
    blob = load_file(f, mmap=True)
    for key in ("config", "state_dict"):
        if not isinstance(blob, dict) or key not in blob:
            have = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
            raise CheckpointError(f"{f}: not an fdtrain model file: no '{key}' entry (has {have}); "
                                  "fdtrain writes model.pt with its config and weights")
    return ModelFile(f, blob["config"], blob["state_dict"], blob.get("step"), blob.get("epoch"),
                     blob.get("metrics") or {})


def checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config a checkpoint folder was trained with (meta.json; model.pt for older checkpoints)."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a complete fdtrain checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: unreadable ({e})") from None
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    return load_model_file(path / "model.pt").config


def plain(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays turned into Python numbers and tensors, so that the
    file it is saved in loads with ``weights_only=True``."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
