"""Optimizer and learning-rate schedules (design/model.md, "Optimisation").

The paper recipe: Adam, lr 2e-4, weight decay 1e-5 *coupled* (added to the gradient, as
``torch.optim.Adam`` does, not decoupled as AdamW), linear warmup over 10,000 steps, then what the
released code does: hold the peak for 10,000 steps and multiply by 0.9 every 3,000 steps
(``hold_step``). ``cosine`` and ``constant`` are offered too.

Scale: the schedule lengths (``warmup_steps``, ``hold_steps``, ``decay_every``) are steps *at*
``optim.reference_batch`` samples per step (the paper's 32). A run with another global batch
G = data.batch_size x processes x grad_accum converts them, so the lr is the same function of the
samples seen: the lr of an update is the schedule's value at u = (samples seen through that update)
/ reference_batch. The peak lr follows ``optim.lr_scaling`` (none, linear or sqrt in
G / reference_batch). ``reference_batch: 0`` turns the conversion off (lengths are this run's
optimizer steps). The scheduler is stepped once per optimizer step and restored with the checkpoint;
a resumed run whose config changed the schedule (longer run, other lr, other global batch) continues
from the samples already seen (:meth:`Schedule.rebase`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fdtrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam with coupled weight decay (``adam``) or AdamW (``adamw``) over the trainable parameters.

    A plain torch optimizer also under DeepSpeed: DeepSpeed's own Adam would JIT-compile
    ``fused_adam`` and is not needed for a 14M-parameter model. ``optim.fused`` (default) picks
    torch's fused kernel (CUDA, and CPU since torch 2.4): one kernel per step, and it takes the
    trainer's on-device ``found_inf`` flag, so a non-finite step is skipped without a host read.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.fused:
        kwargs["fused"] = True
    if cfg.name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (expected adam or adamw)")


def schedule_shape(u: float, cfg: OptimConfig, total: float) -> float:
    """Multiplier of the peak lr after ``u`` reference steps (u = 1 is the first update at the
    reference batch); ``total`` is the run's length in the same unit (used by cosine only).

    Warmup is linear from 1/warmup to 1 so the first update is not wasted at lr 0.
    """
    warm, hold = cfg.warmup_steps, cfg.hold_steps
    if warm > 0 and u < warm:
        return u / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "hold_step":
        if u <= warm + hold:
            return 1.0
        # released code: x decay_rate right after the hold and every decay_every steps after it
        return cfg.decay_rate ** math.ceil((u - warm - hold) / cfg.decay_every - 1e-9)
    if cfg.schedule == "cosine":
        span = max(1e-9, total - warm)
        progress = min(1.0, max(0.0, (u - warm) / span))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r} (expected hold_step, cosine or constant)")


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0 = the first update) of a run at the
    reference batch (one optimizer step = one reference step)."""
    return schedule_shape(step + 1, cfg, total_steps)


def lr_multiplier(cfg: OptimConfig, global_batch: int) -> float:
    """Peak lr / optim.lr at this global batch (optim.lr_scaling relative to optim.reference_batch)."""
    if cfg.lr_scaling == "none" or not cfg.reference_batch:
        return 1.0
    k = global_batch / cfg.reference_batch
    return k if cfg.lr_scaling == "linear" else math.sqrt(k)


@dataclass
class Schedule:
    """The lr schedule of one run, in its optimizer steps at its global batch.

    ``start_step``/``start_samples``: where this schedule took over (0/0 for a fresh run; the
    checkpoint's step and samples seen when a resumed run rebuilds it from a changed config).
    """

    cfg: OptimConfig
    global_batch: int
    total_steps: int
    start_step: int = 0
    start_samples: int = 0

    @property
    def steps_per_reference_step(self) -> float:
        """Optimizer steps of this run per reference step (1 without conversion)."""
        return self.cfg.reference_batch / self.global_batch if self.cfg.reference_batch else 1.0

    @property
    def peak_lr(self) -> float:
        return self.cfg.lr * lr_multiplier(self.cfg, self.global_batch)

    def samples_at(self, step: int) -> int:
        """Training samples seen after ``step`` optimizer steps."""
        return self.start_samples + (step - self.start_step) * self.global_batch

    def units(self, steps_done: int) -> float:
        """Reference steps done after ``steps_done`` optimizer steps."""
        if not self.cfg.reference_batch:
            return float(steps_done)
        return self.samples_at(steps_done) / self.cfg.reference_batch

    def factor(self, step: int) -> float:
        """lr / optim.lr for optimizer step ``step`` (0-based): the schedule after this update's samples."""
        return lr_multiplier(self.cfg, self.global_batch) * schedule_shape(
            self.units(step + 1), self.cfg, self.units(self.total_steps))

    def lr(self, step: int) -> float:
        return self.cfg.lr * self.factor(step)

    def rebase(self, step: int, samples: int) -> None:
        """Continue from a checkpoint taken after ``step`` steps and ``samples`` samples."""
        self.start_step, self.start_samples = int(step), int(samples)

    def summary(self) -> dict[str, Any]:
        """What a checkpoint records of the schedule, for a resumed run to see whether its config changed it."""
        c = self.cfg
        return {"global_batch": self.global_batch, "total_steps": self.total_steps, "peak_lr": self.peak_lr,
                "reference_batch": c.reference_batch, "lr_scaling": c.lr_scaling, "schedule": c.schedule,
                "warmup_steps": c.warmup_steps, "hold_steps": c.hold_steps, "decay_every": c.decay_every,
                "decay_rate": c.decay_rate, "min_lr_ratio": c.min_lr_ratio}

    def in_steps(self, reference_steps: float) -> float:
        """A length in reference steps as optimizer steps of this run."""
        return reference_steps * self.steps_per_reference_step

    def describe(self, steps_per_epoch: int, *, batch: int, processes: int, grad_accum: int) -> str:
        """The effective schedule, printed at the start of every run (and by --print-schedule)."""
        c = self.cfg

        def span(ref_steps: float) -> str:
            s = self.in_steps(ref_steps)
            n = f"{s:.1f}".removesuffix(".0")  # a decay every 187.5 steps falls between steps: say so
            return f"{n} steps = {s / steps_per_epoch:.2f} epochs" if steps_per_epoch else f"{n} steps"

        if c.reference_batch:
            ref = (f"reference batch {c.reference_batch} (schedule lengths below are the recipe's steps at that "
                   f"batch x {self.steps_per_reference_step:g})")
        else:
            ref = "no reference batch (optim.reference_batch=0: schedule lengths are this run's optimizer steps)"
        scaling = "" if lr_multiplier(c, self.global_batch) == 1.0 else (
            f", {c.lr_scaling} scaling of optim.lr={c.lr:g} by {self.global_batch}/{c.reference_batch}")
        lines = [f"schedule: global batch {self.global_batch} = {batch} per process x {processes} process(es) x "
                 f"{grad_accum} accumulation; {ref}",
                 f"  {steps_per_epoch} optimizer steps/epoch, {self.total_steps} in all"
                 + (f" ({self.total_steps / steps_per_epoch:.2f} epochs)" if steps_per_epoch else ""),
                 f"  peak lr {self.peak_lr:.3e}{scaling}",
                 f"  warmup {c.warmup_steps} -> {span(c.warmup_steps)}"]
        if c.schedule == "hold_step":
            lines.append(f"  hold {c.hold_steps} -> {span(c.hold_steps)}; then x{c.decay_rate:g} every "
                         f"{c.decay_every} -> {span(c.decay_every)}")
        elif c.schedule == "cosine":
            lines.append(f"  cosine to {c.min_lr_ratio:g} x peak at the last step")
        else:
            lines.append("  constant after warmup")
        return "\n".join(lines)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    schedule: Schedule | None = None):
    """A LambdaLR over ``schedule`` (default: the reference batch, no conversion); ``.step()`` after
    every optimizer step. Its state is just ``last_epoch`` (= optimizer steps taken) and the base lr.
    """
    sched = schedule or Schedule(cfg, cfg.reference_batch or 1, total_steps)
    # a closure, not the Schedule itself: LambdaLR would save a callable object's fields and load
    # the old run's schedule back over a changed config
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: sched.factor(s))


def apply_schedule(scheduler, cfg: OptimConfig, step: int) -> None:
    """After loading a checkpoint: the base lr from this config (not the saved one) and the lr of
    the next update from the (rebuilt) schedule, so a changed lr or run length takes effect now."""
    scheduler.base_lrs = [cfg.lr] * len(scheduler.optimizer.param_groups)
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["initial_lr"] = cfg.lr
        group["lr"] = lr
    scheduler._last_lr = lrs


def optimizer_steps_per_epoch(micro_batches: int, train_cfg) -> int:
    """Optimizer steps per epoch from the loader's micro-batches per rank: ``train.steps_per_epoch``
    caps them, and the remainder (< grad_accum) is dropped so that epochs and accumulation windows
    line up (and resume lands on a window boundary). 0 when not even one step fits."""
    if train_cfg.steps_per_epoch:
        micro_batches = min(micro_batches, train_cfg.steps_per_epoch)
    return micro_batches // train_cfg.grad_accum


def plan(cfg, num_samples: int, processes: int) -> tuple[Schedule, int]:
    """(schedule, optimizer steps per epoch) of a run on ``processes`` ranks over ``num_samples``
    training samples, without building anything: what ``fdtrain train --print-schedule`` shows."""
    micro = num_samples // (processes * cfg.data.batch_size)  # the loader contract's len() per rank
    spe = optimizer_steps_per_epoch(micro, cfg.train)
    total = cfg.train.max_steps or cfg.train.epochs * spe
    return Schedule(cfg.optim, cfg.data.batch_size * processes * cfg.train.grad_accum, total), spe


# --------------------------------------------------------------------------------------------
# A step skipped on the device: nothing the step would change may change
# --------------------------------------------------------------------------------------------
def grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm (a device tensor, no host read), clipping to ``max_norm`` when > 0."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


class BufferGuard:
    """Snapshot of the model's buffers (BatchNorm running stats) at the start of an accumulation
    window, put back on the device when the window's step is skipped: ``torch.where`` over one flat
    copy per dtype (a handful of kernels, no host read), not a branch on the flag."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.groups = []
        for dtype in dict.fromkeys(b.dtype for b in buffers):
            views = [b.view(-1) for b in buffers if b.dtype == dtype and b.numel()]
            if views:
                self.groups.append((views, [v.numel() for v in views], torch.cat(views)))

    def save(self) -> None:
        for views, _, snap in self.groups:
            torch.cat(views, out=snap)

    def restore_if(self, flag: torch.Tensor) -> None:
        cond = flag.bool()
        for views, sizes, snap in self.groups:
            torch._foreach_copy_(views, list(torch.where(cond, snap, torch.cat(views)).split(sizes)))
