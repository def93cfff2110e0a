"""Optimizer and learning-rate schedules (design/model.md, "Optimisation").

The paper recipe: Adam, lr 2e-4, weight decay 1e-5 *coupled* (added to the gradient, as
``torch.optim.Adam`` does, not decoupled as AdamW), linear warmup over 10,000 steps, then what the
released code does: hold the peak for 10,000 steps and multiply by 0.9 every 3,000 steps
(``hold_step``). ``cosine`` and ``constant`` are offered too. The schedule is a pure function of the
optimizer step, stepped once per optimizer step (not per micro-batch, not per epoch), so a resumed
run lands on exactly the same lr.
"""
from __future__ import annotations

import math

import torch

from fdtrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam with coupled weight decay (``adam``) or AdamW (``adamw``) over the trainable parameters.

    A plain torch optimizer also under DeepSpeed: DeepSpeed's own Adam would JIT-compile
    ``fused_adam`` and is not needed for a 14M-parameter model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (expected adam or adamw)")


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for the optimizer step ``step`` (0 = the first update).

    Warmup is linear from 1/warmup to 1 so the first update is not wasted at lr 0.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    after = step - cfg.warmup_steps  # steps since the end of warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "hold_step":
        if after < cfg.hold_steps:
            return 1.0
        # released code: x decay_rate at the end of the hold and every decay_every steps after it
        return cfg.decay_rate ** (1 + (after - cfg.hold_steps) // cfg.decay_every)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, after / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r} (expected hold_step, cosine or constant)")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A LambdaLR over :func:`lr_factor`; call ``.step()`` after every optimizer step.

    Its state is just ``last_epoch`` (= optimizer steps taken), saved with the checkpoint.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
