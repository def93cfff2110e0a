"""Shared pytest settings: small thread counts for a 2-core machine, the GPU skip, and a check for
free space before anything runs.

`make test` runs two pytest-xdist workers with ``--dist loadfile``: a test module stays on one worker,
so its module fixtures are built once, and the one SLURM module (tests/test_slurm.py) is the only
user of the local cluster it starts and stops. Session fixtures are built once per worker."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# The suite's peak in the temporary folder, measured: 2.2 GB on two workers (a passed test's tmp_path is
# removed when it ends, pyproject.toml). Below this, tests would fail one by one on a full disk; say so once.
MIN_FREE_BYTES = 4 * 1024**3


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller has checked
        return
    tmp = Path(session.config.option.basetemp or tempfile.gettempdir()).absolute()
    while not tmp.exists():  # --basetemp may name a folder pytest has yet to make
        tmp = tmp.parent
    free = shutil.disk_usage(tmp).free
    if free < MIN_FREE_BYTES:
        pytest.exit(f"only {free / 1024**3:.1f} GB free in {tmp}; the suite needs about "
                    f"{MIN_FREE_BYTES / 1024**3:.0f} GB there (old pytest-of-*/ folders can go)", returncode=3)


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none on this machine (run launch/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# Session-scoped data, built once per test session. Tests treat them as read-only: one that damages
# a shard copies the folder (shutil.copytree) or writes its own with tests._data_utils.make_shards.
# ---------------------------------------------------------------------------------------------
def _cached(tmp_path_factory, name: str, build):
    """A factory that builds each distinct argument set once, in its own session folder."""
    made: dict = {}

    def get(*args, **kw):
        key = repr((args, sorted(kw.items())))
        if key not in made:
            made[key] = build(tmp_path_factory.mktemp(name), *args, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def shard_maker(tmp_path_factory):
    """``shard_maker(n, n_shards, **kw)``: a split folder from tests._data_utils.make_shards (fdtrain's
    own shard writer; ``corrupt={position: "truncated" | "garbage" | fn(Sample) -> Sample}``)."""
    from tests._data_utils import make_shards

    return _cached(tmp_path_factory, "shards",
                   lambda root, n, n_shards, split="train", **kw: make_shards(root / split, n, n_shards, **kw))


@pytest.fixture(scope="session")
def easy_dataset(tmp_path_factory):
    """``easy_dataset(train_videos=16, eval_videos=8, shards=4)``: learnable ``{train,val,test}``
    shards (tests._data_utils.write_easy_dataset), one folder per distinct size."""
    from tests._data_utils import write_easy_dataset

    return _cached(tmp_path_factory, "easy", lambda root, **kw: write_easy_dataset(root / "data", **kw))


@pytest.fixture(scope="session")
def easy_data(easy_dataset):
    """The default easy dataset (64 / 32 / 32 frames in 4 shards a split)."""
    return easy_dataset()


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """The synthetic benchmark at a tiny size through the real commands (`fdtrain synth`: 8
    identities, 2 frames, 64 px; `fdtrain shards make --holdout-tests`, every method, 2 shards
    a split): ``<returned>/{train,val,test,test_<Method>...}``."""
    from tests._data_utils import make_synth_shards

    return make_synth_shards(tmp_path_factory.mktemp("synth"), methods="")


@pytest.fixture(scope="session")
def trained_run(easy_data, tmp_path_factory):
    """(data folder, run folder, finished process) of the one short training run that the engine,
    TensorBoard, evaluate/predict, report and serving tests share (tests._engine_utils.trained_run)."""
    from tests import _engine_utils as U

    return U.trained_run(easy_data, tmp_path_factory.mktemp("trained"))
