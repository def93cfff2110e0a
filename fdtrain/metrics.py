"""Frame- and video-level detection metrics: Acc, AUC, EER, AP (scikit-learn underneath).

Scores are probabilities of "fake" (sigmoid of the logit), labels 0 = real, 1 = fake.
- Acc: score > threshold (eval.threshold's default unless given) counts as fake.
- AUC, AP: sklearn's roc_auc_score and average_precision_score.
- EER: where FPR = FNR on sklearn's ROC, linearly interpolated between the two ROC points the
  crossing falls between.
- Video level: the mean frame score per video key (the sample key without its frame index, so
  dataset and method stay part of it), then the same metrics.
A set with one class only has no ROC: AUC, EER and AP are NaN there, Acc is still defined.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fdtrain.config import EvalConfig


def video_key(sample_key: str) -> str:
    """'ffpp/c23/Deepfakes/000_003/0042' -> 'ffpp/c23/Deepfakes/000_003' (drops the frame index)."""
    head, sep, _ = str(sample_key).rpartition("/")
    return head if sep else str(sample_key)


def _as_numpy(values: Any, dtype) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def roc_points(scores: Any, labels: Any) -> dict[str, list[float]]:
    """ROC curve {"fpr", "tpr", "thresholds"} for plots; empty lists when one class is missing."""
    s, y = _as_numpy(scores, np.float64), _as_numpy(labels, np.float64)
    if len(np.unique(y)) < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = roc_curve(y, s)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def equal_error_rate(scores: Any, labels: Any) -> float:
    """EER from sklearn's ROC: the FPR = FNR crossing, interpolated; NaN for a one-class set."""
    s, y = _as_numpy(scores, np.float64), _as_numpy(labels, np.float64)
    if len(np.unique(y)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # -1 at the first ROC point, +1 at the last, non-decreasing in between
    i = int(np.argmax(diff >= 0))  # first point at or past the crossing
    if diff[i] == 0 or i == 0:
        return float(fpr[i])
    t = -diff[i - 1] / (diff[i] - diff[i - 1])  # where the segment from point i-1 to i crosses
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def _metrics(s: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    n_fake = int((y > 0.5).sum())
    out: dict[str, float] = {"n": int(len(y)), "n_real": int(len(y) - n_fake), "n_fake": n_fake}
    if len(y) == 0:
        return {**out, "acc": math.nan, "auc": math.nan, "eer": math.nan, "ap": math.nan}
    out["acc"] = float(((s > threshold) == (y > 0.5)).mean())
    two_classes = 0 < n_fake < len(y)
    out["auc"] = float(roc_auc_score(y, s)) if two_classes else math.nan
    out["eer"] = equal_error_rate(s, y) if two_classes else math.nan
    out["ap"] = float(average_precision_score(y, s)) if two_classes else math.nan
    return out


def video_scores(scores: Any, labels: Any, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean frame score and the label per video key, in order of first appearance."""
    s, y = _as_numpy(scores, np.float64), _as_numpy(labels, np.float64)
    if len(keys) != len(s):
        raise ValueError(f"metrics: {len(keys)} keys for {len(s)} scores")
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, k in enumerate(keys):
        groups.setdefault(video_key(k), []).append(i)
    vs, vy = np.empty(len(groups)), np.empty(len(groups))
    for j, (vk, idx) in enumerate(groups.items()):
        lab = y[idx]
        if lab.min() != lab.max():
            raise ValueError(f"metrics: video '{vk}' has frames labelled both real and fake")
        vs[j], vy[j] = s[idx].mean(), lab[0]
    return vs, vy, list(groups)


def compute_metrics(scores: Any, labels: Any, keys: Optional[Sequence[str]] = None,
                    threshold: float = EvalConfig.threshold) -> dict[str, dict[str, float]]:
    """{"frame": {acc, auc, eer, ap, n, n_real, n_fake}, "video": {...}} (video only with keys)."""
    s, y = _as_numpy(scores, np.float64), _as_numpy(labels, np.float64)
    if len(s) != len(y):
        raise ValueError(f"metrics: {len(s)} scores for {len(y)} labels")
    out = {"frame": _metrics(s, y, threshold)}
    if keys is not None:
        vs, vy, _ = video_scores(s, y, keys)
        out["video"] = _metrics(vs, vy, threshold)
    return out


class MetricAccumulator:
    """Collects scores over an evaluation, gathers them across ranks, computes the metrics.

    ``update`` per batch; ``gather(accelerator)`` once at the end (every rank must call it; None
    or one process: nothing to do); ``compute()`` on any rank. The loaders already drop padded
    duplicates, so gathering concatenates what each rank saw, no more, no less.
    """

    def __init__(self, threshold: float = EvalConfig.threshold):
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._keys: list[str] = []
        self._has_keys = True

    def update(self, scores: Any, labels: Any, keys: Optional[Sequence[str]] = None) -> None:
        s, y = _as_numpy(scores, np.float64), _as_numpy(labels, np.float64)
        if len(s) != len(y) or (keys is not None and len(keys) != len(s)):
            raise ValueError(f"MetricAccumulator.update: {len(s)} scores, {len(y)} labels, "
                             f"{'no' if keys is None else len(keys)} keys")
        self._scores.append(s)
        self._labels.append(y)
        if keys is None:
            self._has_keys = False
        else:
            self._keys.extend(str(k) for k in keys)

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.empty(0)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.empty(0)

    @property
    def keys(self) -> Optional[list[str]]:
        return list(self._keys) if self._has_keys else None

    def __len__(self) -> int:
        return int(sum(len(s) for s in self._scores))

    def gather(self, accelerator=None) -> MetricAccumulator:
        """Replace the local values by those of all ranks, in rank order (collective call)."""
        if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
            return self
        import torch

        # Ranks hold different counts (padding is gone): pad to the longest, gather, trim by count.
        device = accelerator.device
        n = torch.tensor([len(self)], device=device)
        counts = accelerator.gather(n).tolist()  # (world,)
        local = torch.zeros(max(counts), 2, dtype=torch.float64, device=device)
        local[: len(self), 0] = torch.from_numpy(self.scores).to(device)
        local[: len(self), 1] = torch.from_numpy(self.labels).to(device)
        everything = accelerator.gather(local).view(len(counts), max(counts), 2).cpu().numpy()
        rows = np.concatenate([everything[r, :c] for r, c in enumerate(counts)])
        has_keys = all(accelerator.gather(torch.tensor([int(self._has_keys)], device=device)).tolist())
        keys = None
        if has_keys:
            from accelerate.utils import gather_object

            keys = list(gather_object(list(self._keys)))  # concatenated in rank order
            if len(keys) != len(rows):
                raise RuntimeError(f"MetricAccumulator.gather: {len(keys)} keys for {len(rows)} scores")
        self.reset()
        self.update(rows[:, 0], rows[:, 1], keys)
        return self

    def compute(self) -> dict[str, dict[str, float]]:
        return compute_metrics(self.scores, self.labels, self.keys, self.threshold)
