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

from fdtrain.config import ModelConfig

from .fakediffer import SOURCES, FakeDiffer, FakeDifferOutput, XceptionClassifier

__all__ = ["create_model", "create_model_from_config", "FakeDiffer", "FakeDifferOutput", "XceptionClassifier",
           "MODELS", "SOURCES"]


def _fakediffer(cfg: ModelConfig) -> nn.Module:
    return XceptionClassifier(cfg) if cfg.variant == "xception" else FakeDiffer(cfg)


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {"fakediffer": _fakediffer}


def create_model(name: str = "fakediffer", **kw: Any) -> nn.Module:
    """Build a registered model from ModelConfig's fields (unknown fields are an error; the rest
    default and are checked as ModelConfig says)."""
    if name not in MODELS:
        raise ValueError(f"model.name: unknown model '{name}'; registered: {sorted(MODELS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"create_model: unknown model field(s) {unknown}; ModelConfig has {sorted(known)}")
    return create_model_from_config(ModelConfig(name=name, **kw))


def create_model_from_config(model_cfg: ModelConfig) -> nn.Module:
    """The model a fdtrain.config.ModelConfig describes (checked by its validate())."""
    if model_cfg.name not in MODELS:
        raise ValueError(f"model.name: unknown model '{model_cfg.name}'; registered: {sorted(MODELS)}")
    model_cfg.validate()
    return MODELS[model_cfg.name](model_cfg)
