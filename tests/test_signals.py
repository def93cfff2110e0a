"""Preemption: SIGUSR1/SIGTERM -> checkpoint at the next step boundary on every rank -> exit 75 ->
``--resume auto`` finishes the run."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from fdtrain import EXIT_PREEMPTED
from fdtrain.engine import checkpoint as ck
from fdtrain.engine.signals import PreemptionHandler
from tests import _engine_utils as U


def test_handler_sets_a_flag_and_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.stop_requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert h.stop_requested and h.requested == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    with PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert h.requested == signal.SIGTERM  # the first SIGTERM only asks; the process lives on


def _start(cmd, run_dir):
    proc = subprocess.Popen(cmd, cwd=U.REPO, env=U.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # config.yaml appears once the loop is about to start (handlers are installed before it)
    if not U.wait_for(lambda: (run_dir / "config.yaml").is_file(), timeout=300, proc=proc, poll=0.1):
        proc.kill()
        raise AssertionError("training did not start:\n" + proc.communicate()[0][-5000:])
    time.sleep(4)  # a few steps in, so the signal lands mid-epoch
    return proc


def _finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        U.kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError("no exit after the signal:\n" + out[-5000:]) from None
    return out


def _setup(data, tmp_path, name, **extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {{name: {name}}}\n")
    args = U.overrides(data, tmp_path / "runs", name, **{"train.max_steps": 400, "data.val": "", "data.test": {},
                                                         "logging.every_steps": 1, **extra})
    return recipe, args, tmp_path / "runs" / name


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_resume_auto_finishes(easy_dataset, tmp_path):
    recipe, args, run_dir = _setup(easy_dataset(train_videos=8, eval_videos=2, shards=2), tmp_path, "sig1")
    proc = _start(U.fdtrain_cmd("train", str(recipe), *args), run_dir)
    proc.send_signal(signal.SIGUSR1)
    out = _finish(proc)
    assert proc.returncode == EXIT_PREEMPTED, out[-5000:]
    newest = ck.newest_checkpoint(run_dir / "checkpoints")
    assert newest is not None, out[-3000:]
    step = int(newest.name.split("-")[-1])
    assert 0 < step < 400
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == step
    assert "received SIGUSR1" in out and f"exiting with {EXIT_PREEMPTED}" in out

    args = [a for a in args if not a.startswith("--train.max_steps")] + [f"--train.max_steps={step + 3}"]
    done = U.run(U.fdtrain_cmd("train", str(recipe), *args, "--resume", "auto"))
    assert done.returncode == 0, U.explain(done)
    assert f"resumed from {newest} at step {step}" in done.stdout
    assert U.metrics(run_dir)["final_step"] == step + 3
    assert not (run_dir / "preempted.json").exists()


def _workers(proc) -> dict[int, psutil.Process]:
    workers = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "fdtrain" in " ".join(child.cmdline()):
            workers[int(rank)] = child
    assert sorted(workers) == [0, 1], workers
    return workers


def _deliver(case: str, launcher: subprocess.Popen, workers: dict[int, psutil.Process]) -> None:
    if case == "usr1_to_rank1":  # one rank only: the all-reduced flag stops the other at the same step
        workers[1].send_signal(signal.SIGUSR1)
    elif case == "term_to_all_twice":  # scancel / a pre-emption: every process, then the launcher forwards again
        for _ in range(2):
            for p in [psutil.Process(launcher.pid), *workers.values()]:
                p.send_signal(signal.SIGTERM)
            time.sleep(0.3)
    elif case == "usr1_to_launcher_group":  # the workers sit in sessions of their own: only the launcher hears it
        os.killpg(launcher.pid, signal.SIGUSR1)
    elif case == "kill9_launcher":  # nothing to forward: the workers learn of it from the kernel
        launcher.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["usr1_to_rank1", "term_to_all_twice", "usr1_to_launcher_group", "kill9_launcher"])
def test_preemption_matrix_under_fdtrain_launch(easy_dataset, tmp_path, case):
    """2 CPU ranks under `python -m fdtrain.launch accelerate`: every way a pre-emption arrives ends
    in a checkpoint written by both ranks at the same step, exit 75 from the launcher, and no worker
    left running. After SIGTERM to everyone, `--resume auto` ends with the weights of an
    uninterrupted run."""
    recipe, args, run_dir = _setup(easy_dataset(train_videos=8, eval_videos=2, shards=2), tmp_path, "sig2")
    cmd = U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args, fdtrain_launch=True)
    proc = subprocess.Popen(cmd, cwd=U.REPO, env=U.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert U.wait_for(lambda: (run_dir / "config.yaml").is_file(), timeout=300, proc=proc, poll=0.1), (
            proc.communicate()[0][-5000:])
        time.sleep(3)
        workers = _workers(proc)
        _deliver(case, proc, workers)
        out = _finish(proc)
        gone, alive = psutil.wait_procs(list(workers.values()), timeout=120)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        U.kill_tree(proc)
    if case == "kill9_launcher":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == EXIT_PREEMPTED, out[-5000:]
        assert "Traceback" not in out and f"fdtrain.launch: workers exited {EXIT_PREEMPTED}" in out, out[-5000:]
    newest = ck.newest_checkpoint(run_dir / "checkpoints")
    assert newest is not None, out[-5000:]
    # both ranks took part in the save at the same step: each wrote its RNG/loader file
    assert {p.name for p in newest.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    step = int(newest.name.split("-")[-1])
    assert json.loads((run_dir / "preempted.json").read_text()) == {
        "step": step, "exit_code": EXIT_PREEMPTED,
        # rank 0 writes it, with the signal it received itself (none when only rank 1 was signalled)
        "signal": None if case == "usr1_to_rank1" else signal.SIGUSR1 if "usr1" in case else signal.SIGTERM}
    assert not (run_dir / "run.lock").exists()  # released by the workers' exit, even without the launcher
    if case != "term_to_all_twice":
        return

    args = [a for a in args if not a.startswith("--train.max_steps")] + [f"--train.max_steps={step + 2}"]
    done = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args, "--resume", "auto",
                                  fdtrain_launch=True))
    assert done.returncode == 0, U.explain(done)
    ranks = U.metrics(run_dir)["ranks"]
    assert [r["step"] for r in ranks] == [step + 2, step + 2]
    ref = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args, "--run.name=ref",
                                 fdtrain_launch=True))
    assert ref.returncode == 0, U.explain(ref)
    final = f"step-{step + 2:08d}"
    diff = U.max_abs_diff(U.load_state_dict(run_dir / "checkpoints" / final),
                          U.load_state_dict(tmp_path / "runs" / "ref" / "checkpoints" / final))
    assert diff <= 1e-6, diff
