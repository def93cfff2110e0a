"""Optimizer and schedules (design/model.md "Optimisation"): values at the boundaries, stepping."""
import math

import pytest
import torch

from fdtrain.config import OptimConfig
from fdtrain.engine.optim import Schedule, apply_schedule, build_optimizer, build_scheduler, lr_factor


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
    assert lr_factor(99, c, total) == pytest.approx(1.0)  # the last warmup step reaches the peak
    assert lr_factor(199, c, total) == pytest.approx(0.55)
    assert lr_factor(299, c, total) == pytest.approx(0.1)  # the last update is at the floor
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


# ---- scale: schedule lengths at optim.reference_batch, converted to the run's global batch ----
def _lrs_by_samples(c: OptimConfig, global_batch: int, samples: int) -> dict[int, float]:
    """{samples seen through the update: lr of that update} for a run of ``samples`` samples."""
    total = samples // global_batch
    s = Schedule(c, global_batch, total)
    return {(k + 1) * global_batch: s.lr(k) for k in range(total)}


@pytest.mark.parametrize("schedule", ["hold_step", "cosine", "constant"])
def test_lr_is_the_same_function_of_samples_at_any_global_batch(schedule):
    c = cfg(schedule=schedule, reference_batch=32, warmup_steps=100, hold_steps=50, decay_every=30, min_lr_ratio=0.1)
    ref = _lrs_by_samples(c, 32, 32 * 400)
    assert ref == {(k + 1) * 32: c.lr * lr_factor(k, c, 400) for k in range(400)}  # at the reference: unchanged
    for g in (64, 256, 640):  # dividing the run, so the cosine spans the same samples
        big = _lrs_by_samples(c, g, 32 * 400)
        assert len(big) == 32 * 400 // g
        for n, lr in big.items():
            assert lr == pytest.approx(ref[n], rel=1e-12), (g, n)


def test_global_batch_shortens_the_schedule_in_steps():
    c = OptimConfig()  # paper: 10,000 warmup + 10,000 hold, x0.9 every 3,000 steps at batch 32
    s = Schedule(c, 256, 10**6)  # 8 GPUs x 32
    assert s.in_steps(c.warmup_steps) == 1250 and s.in_steps(c.decay_every) == 375
    assert s.lr(1248) < c.lr and s.lr(1249) == c.lr  # warmup ends after 1250 steps ...
    assert s.lr(2499) == c.lr and s.lr(2500) == pytest.approx(0.9 * c.lr)  # ... the hold after 2500
    assert s.lr(2500 + 374) == pytest.approx(0.9 * c.lr) and s.lr(2500 + 375) == pytest.approx(0.81 * c.lr)
    off = Schedule(OptimConfig(reference_batch=0), 256, 10**6)  # no conversion: the recipe's steps
    assert off.in_steps(10000) == 10000 and off.lr(9998) < c.lr and off.lr(9999) == c.lr


@pytest.mark.parametrize("scaling,mult", [("none", 1.0), ("linear", 8.0), ("sqrt", math.sqrt(8.0))])
def test_lr_scaling_sets_the_peak(scaling, mult):
    c = OptimConfig(lr_scaling=scaling, warmup_steps=0)
    assert Schedule(c, 256, 100).peak_lr == pytest.approx(2e-4 * mult)
    assert Schedule(c, 256, 100).lr(0) == pytest.approx(2e-4 * mult)
    assert Schedule(c, 32, 100).peak_lr == pytest.approx(2e-4)  # at the reference batch: the recipe's lr


def test_lr_scaling_needs_a_reference_batch():
    from fdtrain.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="optim.reference_batch"):
        from_dict({"optim": {"lr_scaling": "sqrt", "reference_batch": 0}})


def test_rebuilt_schedule_continues_from_the_samples_seen():
    """A resumed run with a longer cosine: the next lr is the new schedule's at the saved position,
    also when the global batch changed (position counted in samples)."""
    c = cfg(schedule="cosine", reference_batch=32, warmup_steps=10)
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, c)
    old = Schedule(c, 32, 50)
    sched = build_scheduler(opt, c, 50, schedule=old)
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # old schedule: at its floor
    new = Schedule(c, 64, 75)  # extended to 100 reference steps (the 25 new steps at batch 64)
    sched2 = build_scheduler(opt, c, 75, schedule=new)
    sched2.load_state_dict(sched.state_dict())
    new.rebase(50, 50 * 32)
    apply_schedule(sched2, c, 50)
    want = Schedule(c, 32, 100).lr(51)  # the same samples (52 x 32) in a fresh 100-step run at batch 32
    assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12) and want > 0.5 * c.lr


def test_print_schedule_gives_the_readme_worked_example(capsys):
    """README "Scaling": 1 x batch 32 -> 8 x batch 64 per GPU, FF++ c23 (115,200 samples per epoch)."""
    from pathlib import Path

    from fdtrain.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "paper" / "ffpp_c23.yaml"
    base = ["train", str(recipe), "--print-schedule", "--train-samples", "115200"]
    assert main([*base, "--processes", "1"]) == 0
    one = capsys.readouterr().out
    assert "3600 optimizer steps/epoch, 108000 in all" in one and "peak lr 2.000e-04" in one
    assert "warmup 10000 -> 10000 steps = 2.78 epochs" in one
    assert main([*base, "--processes", "8", "--data.batch_size=64", "--optim.lr_scaling=sqrt"]) == 0
    eight = capsys.readouterr().out
    assert "global batch 512 = 64 per process x 8 process(es)" in eight
    assert "225 optimizer steps/epoch, 6750 in all (30.00 epochs)" in eight and "peak lr 8.000e-04" in eight
    assert "warmup 10000 -> 625 steps = 2.78 epochs" in eight
    assert "x0.9 every 3000 -> 187.5 steps = 0.83 epochs" in eight
    s = Schedule(OptimConfig(lr_scaling="sqrt"), 512, 6750)
    decays = [k + 1 for k in range(1, 6750) if s.lr(k) < s.lr(k - 1)]
    assert decays[:3] == [1251, 1438, 1626]  # the updates the README names
