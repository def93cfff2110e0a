"""The training loop on one process: it learns, it writes its run folder, it resumes exactly, it
stops on non-finite losses, it accumulates gradients, and it labels test-set selection."""
from pathlib import Path

import pytest
import torch

from fdtrain.config import resolve
from fdtrain.engine import checkpoint as ck
from tests import _engine_utils as U

pytestmark = pytest.mark.slow


def test_short_run_lifts_validation_auc_well_above_chance(trained_run):
    _, run_dir, proc = trained_run
    assert proc.returncode == 0, U.explain(proc)
    m = U.metrics(run_dir)
    sel = m["selection"]
    assert sel["selected_on"] == "val" and sel["metric"] == "auc" and sel["level"] == "frame"
    assert sel["best_value"] >= 0.8, m  # chance is 0.5
    assert m["test"]["test"]["frame"]["auc"] >= 0.75, m
    assert m["test"]["test"]["frame"]["n"] == 32 and m["test"]["test"]["video"]["n"] == 8
    assert m["final_step"] == 48 and m["epochs"] == 3 and m["nonfinite_skipped"] == 0


def test_run_folder_holds_config_checkpoints_and_metrics(trained_run):
    _, run_dir, _ = trained_run
    cfg = resolve(run_dir / "config.yaml")  # the resolved config feeds back as a recipe
    assert cfg.model.input_size == 64 and cfg.run.name == "tiny"
    steps = [s for s, _ in ck.list_checkpoints(run_dir / "checkpoints")]
    best = ck.best_checkpoint(run_dir / "checkpoints")
    assert steps[-2:] == [32, 48]  # keep_last=2 (epoch ends) ...
    assert best is not None and best.name in {f"step-{s:08d}" for s in steps}  # ... plus the best
    assert len(steps) <= 3
    assert U.metrics(run_dir)["evaluated"].startswith(best.name)
    assert (run_dir / "tb").is_dir()


def test_fresh_run_refuses_a_run_folder_with_checkpoints(trained_run):
    data, run_dir, _ = trained_run
    recipe = run_dir.parent.parent / "tiny.yaml"
    proc = U.run(U.fdtrain_cmd("train", str(recipe), *U.overrides(data, run_dir.parent, "tiny")))
    assert proc.returncode == 2, U.explain(proc)
    assert "already has checkpoints" in proc.stderr and "--resume auto" in proc.stderr


def test_resume_equals_an_uninterrupted_run(easy_data, tmp_path):
    """10 steps, stop, resume, 10 more == 20 uninterrupted: same batches in the same order (the stop
    is mid-epoch, the second half crosses into epoch 2), same step count, same weights and Adam
    moments (tolerance 1e-6; on one CPU thread they come out bit-identical)."""
    def cfg(name, steps, resume=""):
        return resolve(None, U.overrides(easy_data, tmp_path, name, **{
            "train.max_steps": steps, "data.val": "", "data.test": {}, "run.resume": resume,
            "optim.schedule": "hold_step", "optim.hold_steps": 6, "optim.decay_every": 3}))

    keys_a, keys_b, keys_c = [], [], []
    assert U.in_process(cfg("full", 20), keys_a) == 0
    assert U.in_process(cfg("split", 10), keys_b) == 0
    assert U.in_process(cfg("split", 20, resume="auto"), keys_c) == 0

    assert [s for s, _ in keys_a] == list(range(20))
    assert keys_b + keys_c == keys_a  # same data order, resumed at step 10 of epoch 0 (16 steps/epoch)
    full, split = tmp_path / "full" / "checkpoints", tmp_path / "split" / "checkpoints"
    assert ck.newest_checkpoint(full).name == ck.newest_checkpoint(split).name == "step-00000020"
    a, b = ck.newest_checkpoint(full), ck.newest_checkpoint(split)
    assert U.max_abs_diff(U.load_state_dict(a), U.load_state_dict(b)) <= 1e-6
    sa, sb = (torch.load(p / "train_state.pt", weights_only=True) for p in (a, b))
    assert sa["scheduler"] == sb["scheduler"] and sa["scheduler"]["last_epoch"] == 20
    for k, v in sa["optimizer"]["state"].items():
        assert torch.allclose(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"], atol=1e-6, rtol=0)
        assert torch.allclose(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"], atol=1e-9, rtol=0)


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(easy_data, tmp_path, capsys):
    # lr 1e30: the first update throws the weights to ~1e30, every later loss overflows to NaN
    cfg = resolve(None, U.overrides(easy_data, tmp_path, "nan", **{
        "train.max_steps": 20, "train.max_nonfinite": 2, "optim.lr": 1e30, "optim.warmup_steps": 0,
        "checkpoint.every_steps": 1, "data.val": "", "data.test": {}}))
    assert U.in_process(cfg) == 3
    out = capsys.readouterr().out
    assert "3 non-finite steps exceed train.max_nonfinite=2" in out
    newest = ck.newest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert newest.name == "step-00000003" and f"Last good checkpoint: {newest}" in out
    sd = U.load_state_dict(newest)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_grad_accumulation_and_test_set_selection_label(easy_data, tmp_path):
    keys = []
    cfg = resolve(None, U.overrides(easy_data, tmp_path, "acc", **{
        "train.max_steps": 3, "train.grad_accum": 2, "eval.every_steps": 3, "eval.select_on": "test",
        "data.val": ""}))
    assert U.in_process(cfg, keys) == 0
    assert [s for s, _ in keys] == [0, 0, 1, 1, 2, 2]  # two micro-batches per optimizer step
    m = U.metrics(tmp_path / "acc")
    assert m["final_step"] == 3
    assert m["selection"]["selected_on"] == "test:test" and "optimistic" in m["selection"]["note"]
    assert Path(ck.best_checkpoint(tmp_path / "acc" / "checkpoints")).name == "step-00000003"


def test_bf16_autocast_trains_and_saves_fp32_weights(easy_data, tmp_path):
    cfg = resolve(None, U.overrides(easy_data, tmp_path, "bf16", **{
        "train.max_steps": 2, "train.mixed_precision": "bf16", "data.val": "", "data.test": {},
        "logging.every_steps": 1}))
    assert U.in_process(cfg) == 0
    sd = U.load_state_dict(ck.newest_checkpoint(tmp_path / "bf16" / "checkpoints"))
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in sd.values())
