"""Optimizer and schedules (design/model.md "Optimisation"): values at the boundaries, stepping."""
import math

import pytest
import torch

from fdtrain.config import OptimConfig
from fdtrain.engine.optim import build_optimizer, build_scheduler, lr_factor


def cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"warmup_steps": 100, "hold_steps": 50, "decay_every": 30, "decay_rate": 0.9, **kw})


def test_linear_warmup_starts_above_zero_and_reaches_peak():
    c = cfg()
    assert lr_factor(0, c, 1000) == pytest.approx(1 / 100)
    assert lr_factor(49, c, 1000) == pytest.approx(0.5)
    assert lr_factor(99, c, 1000) == pytest.approx(1.0)
    assert all(lr_factor(s, c, 1000) < lr_factor(s + 1, c, 1000) for s in range(99))


def test_hold_step_holds_then_decays_by_rate_every_period():
    c = cfg(schedule="hold_step")
    end_warm, end_hold = 100, 150
    assert lr_factor(end_warm, c, 10**6) == 1.0
    assert lr_factor(end_hold - 1, c, 10**6) == 1.0  # held for exactly hold_steps
    assert lr_factor(end_hold, c, 10**6) == pytest.approx(0.9)
    assert lr_factor(end_hold + 29, c, 10**6) == pytest.approx(0.9)
    assert lr_factor(end_hold + 30, c, 10**6) == pytest.approx(0.81)
    assert lr_factor(end_hold + 300, c, 10**6) == pytest.approx(0.9**11)


def test_paper_recipe_numbers():
    c = OptimConfig()  # defaults are the paper/released-code values
    assert (c.lr, c.weight_decay, c.warmup_steps, c.hold_steps, c.decay_every, c.decay_rate) == (
        2e-4, 1e-5, 10000, 10000, 3000, 0.9)
    assert lr_factor(19999, c, 0) == 1.0 and lr_factor(20000, c, 0) == pytest.approx(0.9)


def test_cosine_runs_from_peak_to_floor():
    c = cfg(schedule="cosine", min_lr_ratio=0.1)
    total = 300
    assert lr_factor(100, c, total) == pytest.approx(1.0)
    assert lr_factor(200, c, total) == pytest.approx(0.55)
    assert lr_factor(300, c, total) == pytest.approx(0.1)
    assert lr_factor(10_000, c, total) == pytest.approx(0.1)  # past the end: stays at the floor


def test_constant_and_no_warmup():
    c = cfg(schedule="constant", warmup_steps=0)
    assert {lr_factor(s, c, 10) for s in (0, 5, 10**6)} == {1.0}


def test_scheduler_steps_once_per_optimizer_step():
    model = torch.nn.Linear(3, 1)
    c = cfg(lr=1e-3, schedule="hold_step")
    opt = build_optimizer(model, c)
    sched = build_scheduler(opt, c, 1000)
    seen = []
    for _ in range(160):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-5) and seen[99] == pytest.approx(1e-3) and seen[150] == pytest.approx(9e-4)
    assert sched.state_dict()["last_epoch"] == 160  # what a checkpoint stores


def _one_step(name: str) -> torch.Tensor:
    p = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    model = torch.nn.Module()
    model.p = p
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.1, weight_decay=0.5))
    p.grad = torch.zeros_like(p)
    opt.step()
    return p.detach()


def test_adam_weight_decay_is_coupled_adamw_decoupled():
    # Adam: the decay joins the gradient (g = wd * p) and goes through the moments: a first step
    # moves each weight by ~lr towards 0 whatever its size. AdamW: p <- p (1 - lr wd), no gradient.
    assert torch.allclose(_one_step("adam"), torch.tensor([2.0 - 0.1, -3.0 + 0.1]), atol=1e-6)
    assert torch.allclose(_one_step("adamw"), torch.tensor([2.0 * 0.95, -3.0 * 0.95]), atol=1e-6)


def test_optimizer_errors_name_the_field():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(torch.nn.Module(), OptimConfig())
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_factor(200, cfg(schedule="linear"), 10)
    assert math.isclose(lr_factor(0, cfg(), 10), 0.01)
