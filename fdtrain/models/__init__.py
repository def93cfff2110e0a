"""Models: FakeDiffer and its ablations, built from timm (design/model.md).

``create_model(name="fakediffer", **fields_of_ModelConfig)`` or
``create_model_from_config(cfg.model)``. No Accelerate, DeepSpeed or DALI here: the engine wraps
the model from outside.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .fakediffer import SOURCES, FakeDiffer, FakeDifferOutput, XceptionClassifier

__all__ = ["create_model", "create_model_from_config", "FakeDiffer", "FakeDifferOutput", "XceptionClassifier",
           "MODELS", "SOURCES"]

CHOICES = {
    "variant": ("fakediffer", "xception", "dual_recons"),
    "forward": ("fused", "two_pass", "fused_exact"),
    "error_encoder": ("shared", "separate", "shared_conv"),
    "fusion": ("select", "residual", "add"),
}


def _fakediffer(variant: str = "fakediffer", **kw: Any) -> nn.Module:
    if variant == "xception":
        return XceptionClassifier(**kw)
    return FakeDiffer(variant=variant, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {"fakediffer": _fakediffer}


def _check(kw: dict[str, Any]) -> None:
    """The checks of fdtrain.config.validate, for callers that skip the Config tree."""
    for key, choices in CHOICES.items():
        if key in kw and kw[key] not in choices:
            raise ValueError(f"model.{key}: expected one of {list(choices)}, got {kw[key]!r}")
    if "sources" in kw:
        src = list(kw["sources"])
        if not src or any(s not in SOURCES for s in src) or len(set(src)) != len(src):
            raise ValueError(f"model.sources: need a non-empty subset of {list(SOURCES)}, got {src}")
    for key in ("dropout", "encoder_dropout"):
        if key in kw and not 0.0 <= kw[key] < 1.0:
            raise ValueError(f"model.{key}: a probability in [0, 1), got {kw[key]}")
    if "input_size" in kw and kw["input_size"] < 32:
        raise ValueError(f"model.input_size: Xception needs at least 32 px, got {kw['input_size']}")
    if "fusion_reduction" in kw and kw["fusion_reduction"] < 1:
        raise ValueError(f"model.fusion_reduction: must be >= 1, got {kw['fusion_reduction']}")


def create_model(name: str = "fakediffer", **kw: Any) -> nn.Module:
    """Build a registered model from ModelConfig's fields (unknown fields are an error)."""
    if name not in MODELS:
        raise ValueError(f"model.name: unknown model '{name}'; registered: {sorted(MODELS)}")
    from fdtrain.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"create_model: unknown model field(s) {unknown}; ModelConfig has {sorted(known)}")
    _check(kw)
    return MODELS[name](**kw)


def create_model_from_config(model_cfg) -> nn.Module:
    """create_model from a fdtrain.config.ModelConfig."""
    return create_model(**dataclasses.asdict(model_cfg))
