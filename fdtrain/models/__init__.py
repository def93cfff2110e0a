"""Models: FakeDiffer and its ablations, built from timm (design/model.md).

``create_model(name="fakediffer", **fields_of_ModelConfig)`` or
``create_model_from_config(cfg.model)``. No Accelerate, DeepSpeed or DALI here: the engine wraps
the model from outside.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from fdtrain.config import ModelConfig

from .fakediffer import SOURCES, FakeDiffer, FakeDifferOutput, XceptionClassifier

__all__ = ["create_model", "create_model_from_config", "FakeDiffer", "FakeDifferOutput", "XceptionClassifier",
           "MODELS", "SOURCES", "route_pointwise_to_onednn", "torch_picks_slow_pointwise"]


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


def torch_picks_slow_pointwise(device: torch.device | str, batch_size: int) -> bool:
    """Whether torch runs a float32 1x1 stride-1 convolution on ``device`` on its im2col + GEMM path
    (``aten::_slow_conv2d``) rather than oneDNN: on the CPU, on one intra-op thread, below a batch
    of 16 (``ConvParams::use_mkldnn`` in ATen's Convolution.cpp)."""
    return torch.device(device).type == "cpu" and torch.get_num_threads() == 1 and batch_size < 16


def route_pointwise_to_onednn(model: nn.Module) -> int:
    """Run ``model``'s 1x1 stride-1 convolutions through oneDNN instead of torch's im2col path.

    For the case ``torch_picks_slow_pointwise`` names, torch sends a 1x1 stride-1 convolution to
    ``aten::_slow_conv2d`` (im2col + GEMM, zero-filled buffers). A 1x1 kernel with dilation 2 is the
    same convolution (no tap moves), and torch hands dilated convolutions to oneDNN: that is all this
    sets, on every such convolution. Measured at batch 4, 1 thread, forward + backward of the whole
    step: faster for Xception and FakeDiffer at 299 and 96 px alike (README, "CPU figures"). The
    weights, the state dict and the math are unchanged (another kernel: float rounding may differ);
    for CPU training only (the trainer and ``bench model`` call it there; on CUDA nothing does).
    Returns how many convolutions moved.
    """
    moved = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
             and m.stride == (1, 1) and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1]
    for m in moved:
        m.dilation = (2, 2)
    return len(moved)
