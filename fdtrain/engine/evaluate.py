"""Distributed evaluation: one set's frame- and video-level metrics, their table and JSON, and
`fdtrain evaluate` (a checkpoint on shard folders, without the trainer). Model selection during
training uses these (fdtrain.engine.selection).

Each rank scores its own part of a split (the loaders give every sample to exactly one rank, with
no padded duplicates); the scores, labels and keys are gathered once per set, and every rank then
computes the same frame- and video-level metrics (fdtrain.metrics), so decisions that depend on
them (the best checkpoint) agree without another collective.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdtrain.config import EvalConfig

log = logging.getLogger(__name__)

@dataclass
class EvalResult:
    """Metrics of one set, plus the gathered raw scores (for the ROC curve)."""

    name: str
    metrics: dict[str, dict[str, float]]
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    keys: list[str] = field(repr=False, default_factory=list)


@torch.no_grad()
def evaluate_loader(model, loader, *, accelerator=None, name: str = "eval", threshold: float = EvalConfig.threshold,
                    max_batches: int = 0, input_dtype: torch.dtype | None = None) -> EvalResult:
    """Score every sample of ``loader`` with ``model`` (inference forward: logits only).

    ``accelerator`` None means a single process; otherwise the per-rank results are gathered once.
    """
    from fdtrain.metrics import MetricAccumulator

    was_training = model.training
    model.eval()
    acc_metrics = MetricAccumulator(threshold=threshold)
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            x = batch["x"] if input_dtype is None else batch["x"].to(input_dtype)
            logits = model(x)  # (B,)
            scores = torch.sigmoid(logits.float())
            acc_metrics.update(scores.cpu(), batch["label"].float().cpu(), list(batch["key"]))
    finally:
        model.train(was_training)
    acc_metrics.gather(accelerator)  # the one collective of this set
    return EvalResult(name, acc_metrics.compute(), acc_metrics.scores, acc_metrics.labels, acc_metrics.keys or [])


def evaluate_folder(model, cfg, name: str, folder: str | os.PathLike, *, device, accelerator=None, rank: int = 0,
                    world: int = 1, threshold: float = 0.5, max_batches: int = 0,
                    input_dtype: torch.dtype | None = None) -> EvalResult:
    """One split folder scored as `fdtrain evaluate` scores it: its eval loader (this rank's share),
    :func:`evaluate_loader`, and the loader closed however that ends."""
    from fdtrain.data import build_loader

    loader = build_loader(cfg, name, rank=rank, world_size=world, device=device, path=str(folder))
    try:
        return evaluate_loader(model, loader, accelerator=accelerator, name=name, threshold=threshold,
                               max_batches=max_batches, input_dtype=input_dtype)
    finally:
        if callable(getattr(loader, "close", None)):
            loader.close()


def log_result(tb, result: EvalResult, step: int) -> None:
    """eval/<set>/<level>/<metric> scalars and the ROC image (rank 0's logger; no-op elsewhere)."""
    tb.metrics(result.name, result.metrics, step)
    if tb.writer is not None and len(np.unique(result.labels)) == 2:
        from fdtrain.metrics import roc_points

        pts = roc_points(result.scores, result.labels)
        tb.roc(result.name, pts["fpr"], pts["tpr"], result.metrics.get("frame", {}).get("auc", float("nan")), step)


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A fixed-width table: one row per (set, level) with acc, auc, eer, ap and counts."""
    cols = ("acc", "auc", "eer", "ap")
    lines = [f"{'set':<24} {'level':<6} " + " ".join(f"{c:>7}" for c in cols) + f" {'n':>7} {'real':>6} {'fake':>6}"]
    for name, levels in results.items():
        for level, m in levels.items():
            vals = " ".join(f"{100 * m[c]:7.2f}" if _finite(m.get(c)) else f"{'-':>7}" for c in cols)
            lines.append(f"{name:<24} {level:<6} {vals} {m.get('n', 0):>7} {m.get('n_real', 0):>6} "
                         f"{m.get('n_fake', 0):>6}")
    return "\n".join(lines) + "\n(acc, auc, eer, ap in %)"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomic JSON write (NaN becomes null: strict JSON readers reject NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_nan_to_none(data), indent=1))
    os.replace(tmp, path)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


# --------------------------------------------------------------------------------------------
# `fdtrain evaluate`: a checkpoint on shard folders, without the trainer
# --------------------------------------------------------------------------------------------
def find_sets(data: str | os.PathLike, name: str = "") -> dict[str, Path]:
    """{set name: split folder}: ``data`` is one split folder (with manifest.json), or a dataset
    folder whose sub-folders are splits (each evaluated, named after the folder; ``name`` may pick
    some of them as a comma list)."""
    data = Path(data)
    if (data / "manifest.json").is_file():
        return {name or data.name: data}
    subs = {p.name: p for p in sorted(data.iterdir()) if (p / "manifest.json").is_file()} if data.is_dir() else {}
    if not subs:
        raise FileNotFoundError(f"{data}: no manifest.json here or in its sub-folders (expected shards written "
                                "by `fdtrain shards make`)")
    if name:
        wanted = [n.strip() for n in name.split(",") if n.strip()]
        missing = [n for n in wanted if n not in subs]
        if missing:
            raise FileNotFoundError(f"{data}: no split folder {missing} (have {sorted(subs)})")
        return {n: subs[n] for n in wanted}
    return subs


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, *, name: str = "",
                        batch_size: int = 0, backend: str = "", device: str = "auto", max_batches: int = 0,
                        threshold: float | None = None) -> dict[str, Any]:
    """Frame- and video-level metrics of a checkpoint on one or more shard folders.

    Runs on one process, or on every rank when started by a launcher (WORLD_SIZE > 1), the
    same evaluation the trainer does.
    """
    from fdtrain.inference import model_from_file
    from fdtrain.model_file import load_model_file

    mf = load_model_file(checkpoint)  # read once: the weights, the config and the step
    model, cfg = model_from_file(mf)
    if batch_size:
        cfg.data.eval_batch_size = batch_size
    if backend:
        cfg.data.backend = backend
    threshold = cfg.eval.threshold if threshold is None else threshold
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
        dev, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    else:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        rank, world = 0, 1
    model.to(dev)
    results = {}
    for set_name, folder in find_sets(data, name).items():
        res = evaluate_folder(model, cfg, set_name, folder, device=dev, accelerator=accelerator, rank=rank,
                              world=world, threshold=threshold, max_batches=max_batches)
        results[set_name] = res.metrics
    fp = checkpoint_fingerprint(mf.path, mf.config, find_sets(data, name)) if rank == 0 else None
    return {"checkpoint": str(mf.path), "step": mf.step, "run": cfg.run.name,
            "input_size": cfg.model.input_size, "threshold": threshold, "results": results,
            "fingerprint": fp, "is_main_process": rank == 0}


def checkpoint_fingerprint(model_file: Path, config: dict[str, Any], sets: dict[str, Path]) -> dict[str, Any]:
    """fdtrain.fingerprint's record for an evaluation of ``model_file`` (trained with ``config``) on
    ``sets``: plus the checkpoint's sha256 and the manifests of the sets evaluated."""
    from fdtrain.fingerprint import fingerprint, manifest_info, sha256_file

    fp = fingerprint(config, checkpoint_selection(model_file))
    fp["checkpoint_sha256"] = sha256_file(model_file)
    fp["evaluated_data"] = {n: manifest_info(f) for n, f in sets.items()}
    return fp


def checkpoint_selection(model_file: Path) -> dict[str, Any]:
    """How this checkpoint was chosen: the run's best (with the rule from best.json) or not."""
    ckpt = model_file.resolve().parent
    best_json = ckpt.parent / "best.json"
    info = json.loads(best_json.read_text()) if best_json.is_file() else {}
    if info.get("checkpoint") == ckpt.name:
        return {"evaluated": f"{ckpt.name} (best)", **{k: v for k, v in info.items() if k != "checkpoint"}}
    return {"evaluated": f"{ckpt.name} (as given: not the run's best)" if info else f"{ckpt.name} (no best recorded)"}
