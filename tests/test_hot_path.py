"""The training step's hot path: no host reads between logging points, and fp16 non-finite steps
with a grad scaler (clipping or not) skipped on the device while the run goes on.

CPU only: Accelerate makes no grad scaler on a CPU, so the fp16 tests install a real
``torch.amp.GradScaler("cpu")`` where Accelerate keeps its own (``acc.scaler``, used by
``acc.backward`` and the trainer's optimizer step).
"""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from fdtrain.config import resolve
from tests import _engine_utils as U

pytestmark = pytest.mark.slow

# What reads a tensor's value back to the host (on a GPU: a device sync).
# nonzero: its output size is a value, so it waits for the device too.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")


@pytest.fixture(scope="module")
def data(easy_dataset):
    return easy_dataset(train_videos=16, eval_videos=2, shards=2)


def _trainer(data, tmp_path, name, **extra):
    from fdtrain.engine.trainer import Trainer

    U.reset_accelerate()
    cfg = resolve(None, U.overrides(data, tmp_path, name, **{
        "data.val": "", "data.test": {}, "logging.image_every": 0, "data.batch_size": 2, **extra}))
    return Trainer(cfg)


def _finish(trainer) -> None:
    trainer.close()
    trainer.acc.end_training()
    U.reset_accelerate()


class _HostReadCounter:
    """Counts calls of the tensor methods that read values back to the host, by the section of the
    trainer they happen in (patched on torch.Tensor for the duration)."""

    def __init__(self, monkeypatch, trainer):
        self.section: str | None = None
        self.counts: dict[str, int] = {}
        self.reads_at: list[int] = []  # optimizer step of each boundary host read
        for name in HOST_READS:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                if self.section is not None:
                    self.counts[self.section] = self.counts.get(self.section, 0) + 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        for method in ("train_step", "_host_read"):
            orig = getattr(trainer, method)

            def section(*a, _orig=orig, _name=method, **k):
                self.section = _name
                if _name == "_host_read":
                    self.reads_at.append(trainer.step)
                try:
                    return _orig(*a, **k)
                finally:
                    self.section = None

            monkeypatch.setattr(trainer, method, section)


def _fit_counting_reads(trainer, monkeypatch) -> _HostReadCounter:
    """Run ``trainer`` to the end with its host reads counted; the patches and the trainer are undone."""
    counter = _HostReadCounter(monkeypatch, trainer)
    try:
        assert trainer.fit() == 0
    finally:
        monkeypatch.undo()
        _finish(trainer)
    return counter


def test_train_step_reads_nothing_back_and_the_boundary_reads_once_per_logging_point(data, tmp_path, monkeypatch):
    """40 steps logged every 20 (32 batches per epoch): no host read inside train_step; one read at
    each step that needs the device's values (first log, logs, the epoch-end checkpoint, the end)."""
    trainer = _trainer(data, tmp_path, "count", **{"train.max_steps": 40, "logging.every_steps": 20,
                                                    "train.grad_accum": 1})
    counter = _fit_counting_reads(trainer, monkeypatch)
    assert trainer.step == 40
    assert counter.counts.get("train_step", 0) == 0, counter.counts
    assert counter.reads_at == [1, 20, 32, 40], counter.reads_at  # 32: epoch end (checkpoint)
    assert counter.counts["_host_read"] == len(counter.reads_at), counter.counts  # one read each
    stats = trainer.last_train_stats
    assert stats["images_per_sec"] > 0 and 0 <= stats["data_wait_share"] < 1
    assert stats["loss/total"] == pytest.approx(stats["loss/total"]) and stats["nonfinite_skipped"] == 0


def test_the_paper_step_reads_nothing_back_either(data, tmp_path, monkeypatch):
    """The paper recipes' step (two_pass, released reduction) splits each batch by class: with the
    loader's host-made class rows, neither the decoder pass nor the loss calls nonzero."""
    trainer = _trainer(data, tmp_path, "paper", **{"train.max_steps": 6, "logging.every_steps": 3,
                                                    "model.forward": "two_pass", "loss.recon_reduction": "released"})
    counter = _fit_counting_reads(trainer, monkeypatch)
    assert trainer.step == 6
    assert counter.counts.get("train_step", 0) == 0, counter.counts
    assert counter.reads_at == [1, 3, 6], counter.reads_at


def _state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.acc.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adam_steps(trainer) -> set[float]:
    return {float(s["step"]) for s in trainer._opt.state.values()}


def _fit_with_a_bad_step(trainer, bad_step: int, value: float, record) -> dict[int, Any]:
    """Run ``trainer`` with one non-finite input at optimizer step ``bad_step`` (0-based); before each
    step, ``record()`` is kept by step. Returns those records, after checking the run finished."""
    seen: dict[int, Any] = {}

    def on_batch(step, batch):
        seen[step] = record()
        if step == bad_step:
            batch["x"] = batch["x"].clone()
            batch["x"][0, 0, 0, 0] = value
            batch["x_noisy"] = batch["x"]

    trainer.on_batch = on_batch
    try:
        assert trainer.fit() == 0
    finally:
        _finish(trainer)
    return seen


@pytest.mark.parametrize("clip,fused", [(0.0, True), (1.0, True), (1.0, False)])
def test_fp16_grad_scaler_skips_a_nonfinite_step_and_trains_on(data, tmp_path, clip, fused):
    """A NaN input at the 3rd step with a GradScaler: before the fix, clipping (and the norm
    measured for logging) unscaled, the step was skipped without scaler.update(), and the 4th step
    raised "unscale_() has already been called". Now: the run finishes, the skip is counted once,
    the skipped step leaves weights, BatchNorm statistics and Adam's step count as they were, the
    scale backs off once, and the following steps train."""
    trainer = _trainer(data, tmp_path, f"fp16_{clip}_{fused}", **{
        "train.max_steps": 6, "logging.every_steps": 3, "optim.grad_clip": clip, "optim.fused": fused})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    trainer.acc.scaler = trainer.optimizer.scaler = scaler
    seen = _fit_with_a_bad_step(trainer, 2, float("nan"), lambda: (_state(trainer), _adam_steps(trainer)))
    snaps, adam = {k: v[0] for k, v in seen.items()}, {k: v[1] for k, v in seen.items()}
    assert trainer.step == 6 and trainer.nonfinite == 1
    assert scaler.get_scale() == 2.0 ** 7  # backed off once, for the skipped step only
    assert adam[3] == adam[2] == {2.0} and adam[5] == {4.0}
    for k, v in snaps[2].items():  # nothing moved, BatchNorm running stats included
        assert torch.equal(v, snaps[3][k]), k
    moved = [k for k, v in snaps[3].items() if v.is_floating_point() and not torch.equal(v, snaps[5][k])]
    assert len(moved) > 0.9 * sum(v.is_floating_point() for v in snaps[3].values())  # it trains on
    assert all(torch.isfinite(v).all() for v in snaps[5].values())


def test_fp32_nonfinite_step_leaves_no_trace_without_a_scaler(data, tmp_path):
    """No scaler: the non-finite flag reaches fused Adam as found_inf; same guarantees."""
    trainer = _trainer(data, tmp_path, "fp32nan", **{"train.max_steps": 4, "logging.every_steps": 4})
    snaps = _fit_with_a_bad_step(trainer, 1, float("inf"), lambda: _state(trainer))
    assert trainer.nonfinite == 1 and trainer.last_train_stats["nonfinite_skipped"] == 1
    for k, v in snaps[1].items():
        assert torch.equal(v, snaps[2][k]), k
    assert not torch.equal(snaps[2]["fc.weight"], snaps[3]["fc.weight"])  # the next step trains


_DS_DRIVER = '''
import json, sys
import torch
from fdtrain.config import resolve
from fdtrain.engine.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(resolve(None, overrides))
seen = {}

def on_batch(step, batch):
    module = trainer.acc.unwrap_model(trainer.model)
    seen[step] = {"params": [p.detach().double().sum().item() for p in module.parameters()],
                  "buffers": [b.detach().double().sum().item() for b in module.buffers()],
                  "adam_steps": sorted(float(s["step"]) for s in trainer._opt.state.values())}
    if step == 2:  # the 3rd optimizer step: a non-finite loss
        batch["x"] = batch["x"].clone()
        batch["x"][0, 0, 0, 0] = float("nan")
        batch["x_noisy"] = batch["x"]

trainer.on_batch = on_batch
code = trainer.fit()
trainer.close()
json.dump({"code": code, "seen": seen, "nonfinite": trainer.nonfinite}, open(out, "w"))
'''


@pytest.mark.multiproc
def test_deepspeed_skipped_step_moves_no_weight_and_no_adam_moment(data, tmp_path):
    """DeepSpeed ZeRO-2 (one CPU process, the project's zero2 launch config): the non-finite window's
    step leaves weights, BatchNorm statistics and Adam's step count as they were; the next trains.
    (The former zero-loss stand-in let Adam step on zero gradients: momentum moved every weight.)"""
    driver = tmp_path / "driver.py"
    driver.write_text(_DS_DRIVER)
    out = tmp_path / "seen.json"
    args = U.overrides(data, tmp_path / "runs", "ds", **{"train.max_steps": 5, "data.val": "", "data.test": {},
                                                          "logging.image_every": 0, "data.batch_size": 2})
    cmd = [U.PY, "-m", "accelerate.commands.launch", "--config_file", str(U.REPO / "launch/accelerate/zero2.yaml"),
           "--num_processes", "1", "--num_machines", "1", "--main_process_port", str(U.free_port()),
           str(driver), str(out), *args]
    proc = U.run(cmd, timeout=900)
    assert proc.returncode == 0, U.explain(proc)
    r = json.loads(out.read_text())
    seen = {int(k): v for k, v in r["seen"].items()}
    assert r["code"] == 0 and r["nonfinite"] == 1, r
    assert seen[3] == seen[2], "the skipped step changed weights, buffers or Adam state"
    assert seen[2]["adam_steps"] and set(seen[4]["adam_steps"]) == {set(seen[3]["adam_steps"]).pop() + 1}
    assert seen[4]["params"] != seen[3]["params"]  # it trains on


def _run_steps(data, tmp_path, name, steps, **extra):
    """(per-step loss, per-step grad norm, state after the first step) of a short fp32 run, no dropout."""
    trainer = _trainer(data, tmp_path, name, **{
        "train.max_steps": steps, "logging.every_steps": 1, "optim.lr": 1e-5, "optim.warmup_steps": 0,
        "model.dropout": 0.0, "model.encoder_dropout": 0.0, **extra})
    stats, first = [], {}

    def on_batch(step, batch):
        if step:
            stats.append(dict(trainer.last_train_stats))
        if step == 1:
            first.update({k: v.detach().clone() for k, v in trainer.acc.unwrap_model(
                trainer.model, keep_torch_compile=False).state_dict().items()})

    trainer.on_batch = on_batch
    try:
        assert trainer.fit() == 0
        stats.append(dict(trainer.last_train_stats))
    finally:
        _finish(trainer)
    return [s["loss/total"] for s in stats], [s["grad_norm"] for s in stats], first


def test_torch_compile_matches_eager_for_a_few_steps(data, tmp_path):
    """train.compile (inductor, C++ on the CPU) against eager, same seed and batches, 3 steps, train-mode
    BatchNorm. Dropout is off (inductor draws its own random numbers) and lr is 1e-5. Tolerances:
    losses 1e-3 relative (float reassociation in fused kernels); gradient norms 1e-1 (the first
    step's, at the same weights, has been seen 6% apart: 243.7 eager vs 229.6 compiled; float32
    rounding, which train-mode BatchNorm over few values amplifies: in float64 the compiled step is
    the eager one to 1e-11 relative in every gradient, ``launch/compile_check.py``, minutes to
    compile, so not run here); the BatchNorm running statistics
    the first step leaves 1e-3 / 1e-5, and the weights after
    it within 2 x lr plus float32 rounding (Adam's first step moves each weight by
    lr * g / (|g| + eps), at most lr; near-zero gradients of opposite sign do part by 2 x lr);
    at batch 2 and 64 px the exit flow's BatchNorm sees 8 values per channel, which amplifies tiny
    differences. Compiling
    takes minutes on a loaded 2-core CPU."""
    # Both on torch's own 1x1 kernels: with train.onednn_pointwise the rounding differs once more
    # (that switch has its own equivalence test, tests/test_model.py) and the second step's gradient
    # norms were seen 10% apart.
    same = {"train.onednn_pointwise": False}
    eager = _run_steps(data, tmp_path, "eager", 3, **same)
    compiled = _run_steps(data, tmp_path, "compiled", 3, **same, **{"train.compile": True})
    assert compiled[0] == pytest.approx(eager[0], rel=1e-3), (eager[0], compiled[0])
    assert compiled[1] == pytest.approx(eager[1], rel=1e-1), (eager[1], compiled[1])
    a, b = eager[2], compiled[2]
    assert a.keys() == b.keys() and a
    worst = {}
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k  # num_batches_tracked
        elif "running_" in k:
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), (k, (a[k] - b[k]).abs().max())
        else:  # + the float32 rounding of the stored weights
            bound = 2 * 1e-5 + 2 * torch.finfo(torch.float32).eps * float(a[k].abs().max())
            worst[k] = float((a[k] - b[k]).abs().max()) / bound
    assert max(worst.values()) <= 1.0, max(worst.items(), key=lambda kv: kv[1])


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_cuda_fp16_with_accelerates_grad_scaler_survives_a_nonfinite_step(data, tmp_path, clip):
    """On a GPU: real fp16 autocast and the grad scaler Accelerate makes itself (torch loader, as on a
    node without DALI). Same guarantees as the CPU test above; run by launch/gpu_check.sh."""
    trainer = _trainer(data, tmp_path, f"cuda_fp16_{clip}", **{
        "run.device": "cuda", "train.mixed_precision": "fp16", "data.backend": "torch", "data.num_workers": 1,
        "train.max_steps": 6, "logging.every_steps": 3, "optim.grad_clip": clip})
    scaler = trainer.acc.scaler
    assert scaler is not None and trainer._fused
    seen = _fit_with_a_bad_step(trainer, 2, float("nan"), lambda: (_state(trainer), scaler.get_scale()))
    snaps, scales = {k: v[0] for k, v in seen.items()}, {k: v[1] for k, v in seen.items()}
    assert trainer.step == 6 and trainer.nonfinite == 1
    assert scales[3] == scales[2] / 2  # the skipped step backed the scale off
    for k, v in snaps[2].items():
        assert torch.equal(v, snaps[3][k]), k
    assert not torch.equal(snaps[3]["fc.weight"], snaps[5]["fc.weight"])
    assert all(torch.isfinite(v).all() for v in snaps[5].values())
