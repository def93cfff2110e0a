"""Scale-correct training: the lr is the same function of samples seen for any global batch
(processes x per-process batch x accumulation), read back from TensorBoard of real runs; a resumed
run with a longer max_steps continues on the new schedule instead of the old one's end."""
import contextlib
import io

import pytest

from fdtrain.config import resolve
from fdtrain.engine.optim import Schedule
from tests import _engine_utils as U

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return U.write_easy_dataset(tmp_path_factory.mktemp("scale") / "data", train_videos=16, eval_videos=2, shards=4)


# warmup 4, hold 2, x0.5 every 2 reference steps of 8 samples: a curve with a ramp, a plateau and steps
SCHEDULE = {"data.batch_size": 8, "optim.reference_batch": 8, "optim.schedule": "hold_step", "optim.warmup_steps": 4,
            "optim.hold_steps": 2, "optim.decay_every": 2, "optim.decay_rate": 0.5, "logging.every_steps": 1,
            "data.val": "", "data.test": {}, "logging.image_every": 0}


@pytest.mark.multiproc
def test_lr_per_sample_is_the_same_on_1x8_2x8_and_with_accumulation(data, tmp_path):
    """64 samples each: 1 process x batch 8 (8 steps), 2 processes x batch 8 (4 steps) and
    1 process x batch 8 x grad_accum 2 (4 steps); the lr logged for the update that ends at n samples
    is the same in the three runs, and the 2-process run prints its converted schedule."""
    runs = tmp_path / "runs"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: r}\n")

    def args(name, **kw):
        return U.overrides(data, runs, name, **{**SCHEDULE, **kw})

    two = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe),
                                 *args("two", **{"train.max_steps": 4})))
    assert two.returncode == 0, U.explain(two)
    assert U.in_process(resolve(None, args("one", **{"train.max_steps": 8}))) == 0
    assert U.in_process(resolve(None, args("acc", **{"train.max_steps": 4, "train.grad_accum": 2}))) == 0
    assert "global batch 16 = 8 per process x 2 process(es) x 1 accumulation" in two.stdout
    assert "warmup 4 -> 2 steps" in two.stdout and "x0.5 every 2 -> 1 steps" in two.stdout

    lr1, lr2, lra = (U.tb_scalars(runs / n, "lr") for n in ("one", "two", "acc"))
    assert sorted(lr1) == list(range(1, 9)) and sorted(lr2) == sorted(lra) == [1, 2, 3, 4]
    by_samples_1 = {8 * s: v for s, v in lr1.items()}
    for lr in (lr2, lra):
        assert {16 * s: v for s, v in lr.items()} == pytest.approx({n: by_samples_1[n] for n in (16, 32, 48, 64)},
                                                                    rel=1e-6)
    # the paper-style curve, per 8 samples: ramp 1/4..1, hold 2, then halvings every 2 reference steps
    assert [lr1[s] / 5e-4 for s in range(1, 9)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.5, 0.5])


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
