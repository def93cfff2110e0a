"""slurm/prep.sbatch on a real SLURM started on this machine (launch/slurm_local.sh): a 2-task job
array crops its shares, the merge job it submits assembles, and the shards equal a plain run's.
Skips, saying why, only when SLURM cannot be installed here."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fdtrain.data.prep.synth import write_benchmark
from tests._data_utils import shards_make

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = os.environ.get("FDTRAIN_SLURM_DIR", "/tmp/fdtrain-slurm")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("SLURM test cluster: Linux only")
    env = {**os.environ, "FDTRAIN_SLURM_DIR": STATE_DIR}
    was_up = subprocess.run(["bash", "launch/slurm_local.sh", "status"], cwd=ROOT, env=env,
                            capture_output=True).returncode == 0
    r = subprocess.run(["bash", "launch/slurm_local.sh", "start"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 3:
        pytest.skip(f"SLURM cannot be installed on this machine: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    env.update(SLURM_CONF=f"{STATE_DIR}/slurm.conf", PATH=env["PATH"] + ":/usr/sbin")
    yield env
    if not was_up:
        subprocess.run(["bash", "launch/slurm_local.sh", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def _gone(env: dict, job: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return not r.stdout.strip()


def _wait_gone(env: dict, job: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _gone(env, job):
            return
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} still queued after {timeout:.0f} s")


def test_prep_array_then_merge_equals_a_plain_run(slurm, tmp_path):
    tree = tmp_path / "tree"
    write_benchmark(tree, videos=8, frames=2, size=48, seed=3, workers=1)
    args = ["--source", "synth", "--root", str(tree), "--methods", "Deepfakes", "--min-shards", "2", "--no-progress"]
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**slurm, "FDTRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "FDTRAIN_PREP_MERGE_ARGS": f"--output={logs}/merge-%j.out --time=10"}
    out = tmp_path / "slurm_out"
    r = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--mem=1G", "--time=10",
                        "--job-name=fdtrain-prep-test", f"--output={logs}/task-%a.out", "slurm/prep.sbatch", *args,
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    array = r.stdout.strip().split(";")[0]
    _wait_gone(slurm, array, 300)
    log0 = (logs / "task-0.out").read_text()
    m = re.search(r"merge job (\d+)", log0)
    assert m, log0
    _wait_gone(slurm, m.group(1), 300)
    for i in (0, 1):
        text = (logs / f"task-{i}.out").read_text()
        assert f"share {i} of 2" in text and "processed" in text, text
    merge_log = (logs / f"merge-{m.group(1)}.out").read_text()
    assert "(16 already done, 0 processed" in merge_log, merge_log  # the array tasks did all the work
    assert "wrote test, train, val" in merge_log, merge_log

    plain = tmp_path / "plain"
    assert shards_make(*args, "--out", str(plain)) == 0
    for split in ("train", "val", "test"):
        a = sorted((out / split).iterdir())
        b = sorted((plain / split).iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        for pa, pb in zip(a, b):
            if pa.suffix in (".tar", ".idx"):
                assert pa.read_bytes() == pb.read_bytes(), pa
