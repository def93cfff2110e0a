"""Evaluation inside a training run: the evaluation sets and model selection ("best").

``Evaluator`` builds each evaluation split's loader once, logs every result to TensorBoard and
counts the samples the loaders skipped (for metrics.json);
``Selection`` owns the rule that picks the best checkpoint (the set, ``eval.metric`` and
``eval.level``), the best value and step so far, and the last selection metrics (all saved in
checkpoints). Every rank computes the same metrics (fdtrain.engine.evaluate gathers the scores),
so every rank reaches the same "improved" decision without another collective.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fdtrain.config import Config
from fdtrain.engine import evaluate as ev
from fdtrain.engine.ranks import gather

HIGHER_IS_BETTER = {"auc": True, "acc": True, "ap": True, "eer": False}


class Selection:
    """Which set and metric pick the best checkpoint, and the best so far."""

    def __init__(self, cfg: Config):
        self.eval = cfg.eval
        self.target = _selection_set(cfg)  # (set name, split for build_loader), or None: nothing to select on
        self.best: dict[str, Any] | None = None  # {"value", "step"} of the best evaluation so far
        self.last_metrics: dict[str, Any] = {}  # {set: metrics} of the last selection evaluation

    def label(self) -> dict[str, Any]:
        name, _ = self.target
        label = {"selected_on": "val" if self.eval.select_on == "val" else f"test:{name}",
                 "metric": self.eval.metric, "level": self.eval.level}
        if self.eval.select_on == "test":
            label["note"] = (f"model selected on the test set '{name}' (as the paper's authors did); "
                             "results on that set are optimistic")
        return label

    def update(self, result: ev.EvalResult, step: int) -> tuple[bool, str]:
        """Record an evaluation of the selection set at ``step``: (whether it is the new best, the line to print)."""
        value = selection_value(result.metrics, self.eval.metric, self.eval.level)
        self.last_metrics = {result.name: result.metrics}
        improved = is_better(value, None if self.best is None else self.best["value"], self.eval.metric)
        if improved:
            self.best = {"value": value, "step": step}
        line = (f"step {step}: {result.name} {self.eval.level} {self.eval.metric} {value:.4f}"
                + (" (best)" if improved else f" (best {self.best['value']:.4f} at step {self.best['step']})"
                   if self.best else ""))
        return improved, line

    def best_record(self) -> dict[str, Any]:
        """What best.json says beside the ``best`` link: the value, the step and the rule."""
        return {**self.best, **self.label()}

    def restore_best(self, ckpt_dir: Path, step: int) -> None:
        """The best so far from best.json: a checkpoint is saved before its step's validation, so
        its own state may predate the best it became."""
        try:
            info = json.loads((ckpt_dir / "best.json").read_text())
        except (OSError, ValueError):
            return
        best_step = info.get("step")
        if isinstance(best_step, int) and best_step <= step and (self.best is None or best_step >= self.best["step"]):
            self.best = {"value": info["value"], "step": best_step}

    def report(self) -> dict[str, Any]:
        """The selection's part of metrics.json (nothing when no set was selected on)."""
        if self.target is None or self.best is None:
            return {}
        return {"selection": {**self.label(), "best_value": self.best["value"], "best_step": self.best["step"]},
                "selection_metrics": self.last_metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "last_metrics": self.last_metrics}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.best = sd.get("best")
        self.last_metrics = sd.get("last_metrics", {})


def selection_value(metrics: dict[str, dict[str, float]], metric: str, level: str) -> float:
    """The selection metric, NaN when the level or metric is absent (e.g. one class only)."""
    v = metrics.get(level, {}).get(metric)
    return float(v) if v is not None else float("nan")


def is_better(value: float, best: float | None, metric: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best


def _selection_set(cfg: Config) -> tuple[str, str] | None:
    """The selection set; fdtrain.config.validate has checked that a test set named for it exists."""
    if cfg.eval.select_on == "val":
        return ("val", "val") if cfg.data.val else None
    name = cfg.eval.select_test or next(iter(cfg.data.test))
    return name, name


class Evaluator:
    """The run's evaluation sets: each split's loader built on first use and kept (every rank)."""

    def __init__(self, cfg: Config, acc, tb, build_loader, input_dtype=None):
        self.cfg, self.acc, self.tb = cfg, acc, tb
        self._build_loader, self.input_dtype = build_loader, input_dtype
        self.loaders: dict[str, Any] = {}

    def evaluate(self, model, name: str, split: str, step: int) -> ev.EvalResult:
        """Metrics of ``model`` on one set, logged to TensorBoard at ``step``."""
        if split not in self.loaders:
            self.loaders[split] = self._build_loader(self.cfg, split, rank=self.acc.process_index,
                                                     world_size=self.acc.num_processes, device=self.acc.device)
        result = ev.evaluate_loader(model, self.loaders[split], accelerator=self.acc, name=name,
                                    threshold=self.cfg.eval.threshold, max_batches=self.cfg.eval.max_batches,
                                    input_dtype=self.input_dtype)
        ev.log_result(self.tb, result, step)
        return result

    def skipped_samples(self, train_loader) -> dict[str, Any]:
        """Samples skipped as undecodable (data.on_corrupt=skip) per split, over every rank: a count
        and up to 100 keys with the shard and reason."""
        loaders = {"train": train_loader, **self.loaders}
        mine = {split: dict(getattr(loader, "skipped", {})) for split, loader in loaders.items()}
        merged: dict[str, dict[str, str]] = {}
        for part in gather(self.acc, mine):
            for split, skipped in part.items():
                merged.setdefault(split, {}).update(skipped)
        return {split: {"count": len(d), "samples": dict(sorted(d.items())[:100])} for split, d in merged.items()}

    def close(self) -> None:
        for loader in self.loaders.values():
            closer = getattr(loader, "close", None)
            if callable(closer):
                closer()
