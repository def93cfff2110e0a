"""Exact resume after a real kill -9, for every loader backend: N steps, SIGKILL after a periodic
checkpoint, ``--resume auto`` == the uninterrupted run (same batches from the resumed step on, same
final weights; dropout and the noisy view draw from the restored RNG streams). One process here
(the resumed part crosses an epoch end); two processes in tests/test_scale.py."""
import pytest

from fdtrain.config import resolve
from fdtrain.engine import checkpoint as ck
from tests import _engine_utils as U

pytestmark = pytest.mark.slow

STEPS = 11  # 8 steps per epoch (32 samples, batch 4): the resumed part crosses into epoch 2


@pytest.fixture(scope="module")
def data(easy_dataset):
    return easy_dataset(train_videos=8, eval_videos=2, shards=4)


@pytest.mark.parametrize("backend,workers", [("dali", 0), ("torch", 0), ("torch", 2)])
def test_kill_9_then_resume_auto_equals_the_uninterrupted_run(data, tmp_path, backend, workers):
    def args(name, resume=""):
        return U.overrides(data, tmp_path, name, **{
            "data.backend": backend, "data.num_workers": workers, "train.max_steps": STEPS,
            "checkpoint.every_steps": 3, "data.val": "", "data.test": {}, "logging.image_every": 0,
            "data.noise_std": 0.05, "optim.schedule": "hold_step", "optim.hold_steps": 2, "optim.decay_every": 2,
            "run.resume": resume})

    keys_full, keys_resumed = [], []
    assert U.in_process(resolve(None, args("full")), keys_full) == 0

    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: r}\n")
    cmd = U.fdtrain_cmd("train", str(recipe), *args("k9"))
    at = U.kill_after_first_checkpoint(cmd, tmp_path / "k9" / "checkpoints")
    assert 3 <= at < STEPS
    assert U.in_process(resolve(None, args("k9", resume="auto")), keys_resumed) == 0

    assert keys_resumed == keys_full[at:]  # the same batches from the resumed step on
    a, b = (ck.newest_checkpoint(tmp_path / n / "checkpoints") for n in ("full", "k9"))
    assert a.name == b.name == f"step-{STEPS:08d}"
    assert U.max_abs_diff(U.load_state_dict(a), U.load_state_dict(b)) <= 1e-6
