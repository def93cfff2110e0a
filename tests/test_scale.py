"""Scale-correct training: the lr is the same function of samples seen for any global batch
(processes x per-process batch x accumulation), read back from TensorBoard of real runs; a resumed
run with a longer max_steps continues on the new schedule instead of the old one's end."""
import contextlib
import io

import pytest

from fdtrain.config import resolve
from fdtrain.engine import checkpoint as ck
from fdtrain.engine.optim import Schedule
from tests import _engine_utils as U

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(easy_dataset):
    return easy_dataset(train_videos=16, eval_videos=2, shards=4)


# warmup 4, hold 2, x0.5 every 2 reference steps of 8 samples: a curve with a ramp, a plateau and steps
SCHEDULE = {"data.batch_size": 8, "optim.reference_batch": 8, "optim.schedule": "hold_step", "optim.warmup_steps": 4,
            "optim.hold_steps": 2, "optim.decay_every": 2, "optim.decay_rate": 0.5, "logging.every_steps": 1,
            "data.val": "", "data.test": {}, "logging.image_every": 0}


def _args(data, runs, name, **kw):
    return U.overrides(data, runs, name, **{**SCHEDULE, **kw})


# two ranks on the PyTorch fallback (1 worker each): 4 steps of 16 samples per epoch, 6 steps
TWO = {"train.max_steps": 6, "data.backend": "torch", "data.num_workers": 1, "checkpoint.every_steps": 2}


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """(runs folder, recipe, finished process) of one uninterrupted 2-process run, shared below."""
    root = tmp_path_factory.mktemp("two")
    recipe = root / "r.yaml"
    recipe.write_text("run: {name: r}\n")
    proc = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe),
                                  *_args(data, root / "runs", "two", **TWO)))
    assert proc.returncode == 0, U.explain(proc)
    return root / "runs", recipe, proc


@pytest.mark.multiproc
def test_lr_per_sample_is_the_same_on_1x8_2x8_and_with_accumulation(data, two_ranks, tmp_path):
    """1 process x batch 8 (8 steps), 2 processes x batch 8 (the first 4 of its 6 steps) and
    1 process x batch 8 x grad_accum 2 (4 steps): 64 samples; the lr logged for the update that ends
    at n samples is the same in the three runs, and the 2-process run prints its converted schedule."""
    runs, _, two = two_ranks
    assert "global batch 16 = 8 per process x 2 process(es) x 1 accumulation" in two.stdout
    assert "warmup 4 -> 2 steps" in two.stdout and "x0.5 every 2 -> 1 steps" in two.stdout
    assert U.in_process(resolve(None, _args(data, tmp_path, "one", **{"train.max_steps": 8}))) == 0
    assert U.in_process(resolve(None, _args(data, tmp_path, "acc", **{"train.max_steps": 4,
                                                                      "train.grad_accum": 2}))) == 0

    lr1, lr2, lra = U.tb_scalars(tmp_path / "one", "lr"), U.tb_scalars(runs / "two", "lr"), \
        U.tb_scalars(tmp_path / "acc", "lr")
    assert sorted(lr1) == list(range(1, 9)) and sorted(lr2) == list(range(1, 7)) and sorted(lra) == [1, 2, 3, 4]
    by_samples_1 = {8 * s: v for s, v in lr1.items()}
    want = {16 * k: by_samples_1[16 * k] for k in range(1, 5)}
    for lr in (lr2, lra):
        assert {16 * k: lr[k] for k in range(1, 5)} == pytest.approx(want, rel=1e-6)
    # the paper-style curve, per 8 samples: ramp 1/4..1, hold 2, then halvings every 2 reference steps
    assert [lr1[s] / 5e-4 for s in range(1, 9)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.5, 0.5])
    assert [lr2[s] / 5e-4 for s in (5, 6)] == pytest.approx([0.25, 0.125])  # 80 and 96 samples


@pytest.mark.multiproc
def test_two_ranks_kill_9_then_resume_auto_equals_the_uninterrupted_run(data, two_ranks):
    """The same 2-process run SIGKILLed (launcher and ranks) after its step-2 checkpoint, resumed
    with --resume auto across the epoch end: the same final weights on the fallback loader."""
    runs, recipe, _ = two_ranks
    args = _args(data, runs, "k9", **TWO)
    at = U.kill_after_first_checkpoint(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args),
                                       runs / "k9" / "checkpoints")
    assert at < 4  # resumed inside the first epoch
    proc = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args, "--resume", "auto"))
    assert proc.returncode == 0, U.explain(proc)
    assert f"at step {at}" in proc.stdout
    a, b = (ck.newest_checkpoint(runs / n / "checkpoints") for n in ("two", "k9"))
    assert a.name == b.name == "step-00000006"
    assert U.max_abs_diff(U.load_state_dict(a), U.load_state_dict(b)) <= 1e-6
    ranks = U.metrics(runs / "k9")["ranks"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]


def test_raising_max_steps_on_resume_rebuilds_the_schedule(data, tmp_path):
    """cosine over 6 steps, then --train.max_steps=10 --resume auto: steps 7-10 take the lr of a
    fresh 10-step cosine run (not the old schedule's floor), and the run says what changed."""
    def cfg(name, steps, resume=""):
        return resolve(None, U.overrides(data, tmp_path, name, **{
            **SCHEDULE, "data.batch_size": 4, "optim.reference_batch": 4, "optim.schedule": "cosine",
            "optim.warmup_steps": 2, "train.max_steps": steps, "run.resume": resume}))

    assert U.in_process(cfg("ext", 6)) == 0
    lr_old = U.tb_scalars(tmp_path / "ext", "lr")
    assert lr_old[6] == pytest.approx(0.0, abs=1e-12)  # the 6-step cosine ends at 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert U.in_process(cfg("ext", 10, resume="auto")) == 0
    assert "schedule rebuilt from the new config at step 6" in out.getvalue()
    assert "total_steps 6 -> 10" in out.getvalue()
    lr_ext = U.tb_scalars(tmp_path / "ext", "lr")
    fresh = Schedule(cfg("x", 10).optim, 4, 10)
    assert [lr_ext[s] for s in range(7, 11)] == pytest.approx([fresh.lr(s - 1) for s in range(7, 11)], rel=1e-6)
    assert lr_ext[7] > 0.3 * 5e-4


def test_process_group_timeout_comes_from_run_nccl_timeout_s():
    """The handler Accelerate passes to init_process_group (seen on a 2-rank gloo group as the
    backend's options._timeout when launched with torchrun)."""
    from datetime import timedelta

    from fdtrain.engine.accel import build_accelerator

    U.reset_accelerate()
    try:
        acc = build_accelerator(resolve(None, ["--run.device=cpu", "--run.nccl_timeout_s=123",
                                               "--train.mixed_precision=no"]))
        assert acc.init_handler.timeout == timedelta(seconds=123)
    finally:
        U.reset_accelerate()


@pytest.mark.multiproc
def test_a_rank_local_data_error_names_its_rank_and_host(tmp_path):
    """A corrupt image in one rank's part of the shards: that rank's message says which rank and host."""
    import re

    from tests._data_utils import make_shards

    bad = make_shards(tmp_path / "bad", 32, 4, corrupt={9: "garbage"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: bad}\n")
    args = U.overrides(tmp_path, tmp_path / "runs", "bad", **{
        "data.train": str(bad), "data.val": "", "data.test": {}, "train.max_steps": 4})
    proc = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args))
    assert proc.returncode != 0
    assert re.search(r"rank [01] on \S+: undecodable image in shard \S+, key \S+", proc.stderr), U.explain(proc)
