"""A real SLURM on this machine: slurm/train.sbatch runs `fdtrain train` with 2 CPU processes, and a
job warned of its time limit checkpoints, requeues itself and finishes with `--resume auto`; a job array
over seeds then `fdtrain report`; and slurm/prep.sbatch's array + merge job equal a plain
`fdtrain shards make`. Every SLURM test lives in this one module: under `make test`'s pytest-xdist
(--dist loadfile) one worker owns the local cluster, which the module fixture starts and stops.

launch/slurm_local.sh starts munged, slurmctld and slurmd from a minimal slurm.conf (installing
Debian's packages when they are missing); the tests skip, saying why, only when SLURM cannot be
installed here. The data is the session's tiny synthetic benchmark (the ``synth_shards`` fixture: the real
`fdtrain synth` and `fdtrain shards make`).

Polling: `sbatch --wait` polls slowly (up to ~30 s late), so the tests poll squeue / scontrol.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fdtrain.data.prep.synth import write_benchmark
from tests._data_utils import shards_make

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "launch" / "slurm_local.sh"
STATE_DIR = os.environ.get("FDTRAIN_SLURM_DIR", "/tmp/fdtrain-slurm")
CANNOT_INSTALL = 3  # launch/slurm_local.sh's exit status when SLURM cannot be installed here


def _run(cmd: list[str], env: dict | None = None, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout


@pytest.fixture(scope="module")
def slurm_env():
    """Environment in which sbatch/squeue/scontrol reach the local cluster; stops it afterwards if we started it."""
    if sys.platform != "linux":
        pytest.skip("SLURM test cluster: Linux only")
    env = {**os.environ, "FDTRAIN_SLURM_DIR": STATE_DIR}
    was_up = subprocess.run(["bash", str(SLURM_LOCAL), "status"], env=env, capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(SLURM_LOCAL), "start"], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == CANNOT_INSTALL:
        pytest.skip(f"SLURM cannot be installed on this machine: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, f"launch/slurm_local.sh start failed:\n{r.stderr[-3000:]}"
    env["SLURM_CONF"] = f"{STATE_DIR}/slurm.conf"
    env["PATH"] = env["PATH"] + ":/usr/sbin"
    yield env
    if not was_up:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], env=env, capture_output=True, timeout=120)


def _tiny_overrides(shards: Path, out_dir: Path, name: str, max_steps: int) -> list[str]:
    """recipes/demo.yaml shrunk to seconds: 64 px, batch 4 per rank, data from the fixture."""
    return [
        f"--run.out_dir={out_dir}", f"--run.name={name}", f"--train.max_steps={max_steps}",
        "--model.input_size=64", "--data.batch_size=4", "--data.eval_batch_size=8",
        f"--data.train={shards}/train", f"--data.val={shards}/val",
        f"--data.test={{in_domain: {shards}/test, NeuralTextures: {shards}/test_NeuralTextures}}",
        "--logging.every_steps=1", "--logging.image_every=0", "--logging.progress=plain",
    ]


def _submit(env: dict, log: Path, args: list[str], script: str = "slurm/train.sbatch", **extra_env) -> str:
    """sbatch in the CPU test mode: no GPU asked for, 2 CPUs, the test's python."""
    job_env = {**env, "FDTRAIN_CPU": "1", "FDTRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra_env}
    out = _run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=20",
                "--job-name=fdtrain-test", f"--output={log}", script, *args], env=job_env)
    return out.strip().split(";")[0]


def _job(env: dict, job: str) -> dict[str, str]:
    text = _run(["scontrol", "show", "job", job], env=env)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _state(env: dict, job: str) -> tuple[str, str]:
    out = _run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, check=False).split()
    return (out[0], out[1] if len(out) > 1 else "") if out else ("", "")


def _wait(env: dict, job: str, log: Path, timeout: float, until=None) -> dict[str, str]:
    """Poll until the job leaves the queue (or `until(log_text)` holds); returns scontrol's record.

    A requeued job is held ~2 minutes (Reason=BeginTime) before it may start again; on a real
    cluster that is harmless, here it is lifted so the test does not sit idle. Not at once:
    slurmd refuses a launch whose credential is as old as the requeue's revocation (same second:
    "Job credential revoked"), so the hold is lifted a few seconds after it began.
    """
    end = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < end:
        state, reason = _state(env, job)
        text = log.read_text(errors="replace") if log.exists() else ""
        if until is not None and until(text):
            return _job(env, job)
        if state in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return _job(env, job)
        if state == "PENDING" and reason == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 3:
                _run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=False)
        else:
            held_since = None
        time.sleep(0.5)
    _run(["scancel", job], env=env, check=False)
    raise AssertionError(f"job {job} not done after {timeout:.0f} s; log:\n{log.read_text()[-4000:]}")


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_train_sbatch_runs_two_cpu_ranks(slurm_env, synth_shards, tmp_path, launcher):
    log = tmp_path / "job.out"
    args = ["recipes/demo.yaml", *_tiny_overrides(synth_shards, tmp_path / "runs", "slurm_plain", max_steps=3)]
    job = _submit(slurm_env, log, args, FDTRAIN_LAUNCHER=launcher)
    rec = _wait(slurm_env, job, log, timeout=600)
    text = log.read_text()
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    launched = {"accelerate": "-m fdtrain.launch accelerate", "torchrun": "-m fdtrain.launch torchrun"}[launcher]
    assert launched in text and "2 process(es)" in text and "on 2 x cpu" in text, "expected 2 CPU ranks"
    run = tmp_path / "runs" / "slurm_plain"
    assert (run / "config.yaml").is_file() and any((run / "checkpoints").iterdir())
    metrics = json.dumps(json.loads((run / "metrics.json").read_text()))
    assert "in_domain" in metrics and "NeuralTextures" in metrics
    if launcher != "accelerate":
        return
    # slurm/eval.sbatch on the run just trained
    elog, out = tmp_path / "eval.out", tmp_path / "eval.json"
    job = _submit(slurm_env, elog, ["--checkpoint", str(run), "--data", f"{synth_shards}/test_NeuralTextures",
                                    "--out", str(out)], script="slurm/eval.sbatch")
    rec = _wait(slurm_env, job, elog, timeout=300)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), elog.read_text()[-4000:]
    result = json.loads(out.read_text())
    assert '"auc"' in json.dumps(result) and '"video"' in json.dumps(result)


@pytest.mark.parametrize("how", ["USR1 to the batch shell", "TERM to the step"])
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_env, synth_shards, tmp_path, how):
    """What --signal=B:USR1@120 delivers (SIGUSR1 to the batch shell only), and what a pre-emption
    delivers through srun (SIGTERM to every process of the step: launcher and workers at once)."""
    log = tmp_path / "job.out"
    steps = 12
    args = ["recipes/demo.yaml", *_tiny_overrides(synth_shards, tmp_path / "runs", "slurm_requeue", max_steps=steps)]
    job = _submit(slurm_env, log, args)
    _wait(slurm_env, job, log, timeout=600, until=lambda t: re.search(r"^step \d+/", t, re.M) is not None)
    if how.startswith("USR1"):
        _run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env)
    else:
        _run(["scancel", "--signal=TERM", job], env=slurm_env)
    rec = _wait(slurm_env, job, log, timeout=900)
    text = log.read_text()
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-5000:]
    assert "SIGUSR1 (time limit near)" in text if how.startswith("USR1") else "received SIGTERM" in text
    assert re.search(r"preempted: checkpoint at step \d+ written", text)
    assert "requeueing job" in text and f"job {job} restart 1" in text
    m = re.search(r"resumed from \S+ at step (\d+)", text)
    assert m, "the requeued run did not resume from its checkpoint"
    assert 0 < int(m.group(1)) < steps
    run = tmp_path / "runs" / "slurm_requeue"
    assert (run / "metrics.json").is_file() and not (run / "preempted.json").exists()
    final = max(int(p.name.split("-")[-1]) for p in (run / "checkpoints").glob("step-*"))
    assert final == steps


def test_seeds_sbatch_one_run_per_seed_then_report(slurm_env, synth_shards, tmp_path):
    """A job array over run.seed: each task trains in its own run folder; `fdtrain report` averages them."""
    seeds_dir = tmp_path / "seeds"
    over = [o for o in _tiny_overrides(synth_shards, tmp_path / "unused", "seedrun", max_steps=2)
            if not o.startswith("--run.out_dir=")]
    log = tmp_path / "seeds-%a.out"
    # one CPU process per seed, so the two tasks run side by side on the test node's 2 CPUs
    out = _run(["sbatch", "--parsable", "--array=1-2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
                "--job-name=fdtrain-test", f"--output={log}", "slurm/seeds.sbatch", "recipes/demo.yaml", *over],
               env={**slurm_env, "FDTRAIN_CPU": "1", "FDTRAIN_PROCS_PER_NODE": "1", "FDTRAIN_PYTHON": sys.executable,
                    "OMP_NUM_THREADS": "1", "FDTRAIN_SEEDS_DIR": str(seeds_dir)})
    array_job = out.strip().split(";")[0]
    try:
        for task in (1, 2):
            task_log = tmp_path / f"seeds-{task}.out"
            rec = _wait(slurm_env, f"{array_job}_{task}", task_log, timeout=600)
            assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), task_log.read_text()[-4000:]
            config = yaml.safe_load((seeds_dir / f"seed-{task}" / "seedrun" / "config.yaml").read_text())
            assert config["run"]["seed"] == task and config["run"]["out_dir"] == str(seeds_dir / f"seed-{task}")
    finally:  # a failed check must not leave the other task holding the test cluster
        _run(["scancel", array_job], env=slurm_env, check=False)
    runs = [str(seeds_dir / f"seed-{t}" / "seedrun") for t in (1, 2)]
    md = _run([sys.executable, "-m", "fdtrain", "report", *runs], env=slurm_env)
    assert "## seedrun" in md and "2 run(s)" in md and re.search(r"\| in_domain \| frame \| 2 \|", md), md


# ---- data preparation ----------------------------------------------------------------------------
def _wait_gone(env: dict, job: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _state(env, job)[0]:
            return
        time.sleep(0.5)
    _run(["scancel", job], env=env, check=False)
    raise AssertionError(f"job {job} still queued after {timeout:.0f} s")


def test_prep_array_then_merge_equals_a_plain_run(slurm_env, tmp_path):
    """slurm/prep.sbatch: a 2-task job array crops its shares, the merge job it submits assembles,
    and the shards equal a plain run's."""
    tree = tmp_path / "tree"
    write_benchmark(tree, videos=8, frames=2, size=48, seed=3, workers=1)
    args = ["--source", "synth", "--root", str(tree), "--methods", "Deepfakes", "--min-shards", "2", "--no-progress"]
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**slurm_env, "FDTRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "FDTRAIN_PREP_MERGE_ARGS": f"--output={logs}/merge-%j.out --time=10"}
    out = tmp_path / "slurm_out"
    array = _run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--mem=1G", "--time=10",
                  "--job-name=fdtrain-prep-test", f"--output={logs}/task-%a.out", "slurm/prep.sbatch", *args,
                  "--out", str(out)], env=env).strip().split(";")[0]
    _wait_gone(slurm_env, array, 300)
    log0 = (logs / "task-0.out").read_text()
    m = re.search(r"merge job (\d+)", log0)
    assert m, log0
    _wait_gone(slurm_env, m.group(1), 300)
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
