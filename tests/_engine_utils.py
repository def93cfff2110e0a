"""Shared helpers of the engine tests: configs, launching real processes, the shared training run.

Their learnable data is ``write_easy_dataset`` of tests/_data_utils.py (the ``easy_dataset`` fixture).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def overrides(data: Path, out_dir: Path, name: str, **extra) -> list[str]:
    """Command-line overrides of a tiny CPU run (64 px, batch 4, fp32, DALI CPU, 1 thread)."""
    base = {
        "run.name": name, "run.out_dir": str(out_dir), "run.device": "cpu",
        "model.input_size": 64, "data.batch_size": 4, "data.eval_batch_size": 8,
        "data.train": str(data / "train"), "data.val": str(data / "val"),
        "data.backend": "dali", "data.num_threads": 1, "data.num_workers": 1, "data.prefetch": 1,
        "data.shuffle_buffer": 16,
        "train.mixed_precision": "no", "train.epochs": 1,
        "optim.lr": 5e-4, "optim.warmup_steps": 4, "optim.schedule": "constant", "optim.reference_batch": 4,
        "logging.every_steps": 4, "logging.image_every": 8, "logging.progress": "plain",
        "checkpoint.keep_last": 2,
    }
    base.update(extra)
    out = [f"--{k}={v}" for k, v in base.items() if k != "data.test"]
    test = extra.get("data.test", {"test": str(data / "test")})
    out.append("--data.test={" + ", ".join(f"{k}: {v}" for k, v in test.items()) + "}")
    return out


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", "")})
    for k in ("ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fdtrain_cmd(*args: str) -> list[str]:
    return [PY, "-m", "fdtrain", *args]


def accelerate_cmd(config: str, *args: str, num_processes: int = 2, fdtrain_launch: bool = False) -> list[str]:
    """``accelerate launch`` with one of launch/accelerate/*.yaml, 2 processes, a free port; through
    ``python -m fdtrain.launch accelerate`` (what README and slurm_node.sh run) with fdtrain_launch."""
    launcher = ["fdtrain.launch", "accelerate"] if fdtrain_launch else ["accelerate.commands.launch"]
    return [PY, "-m", *launcher, "--config_file", str(REPO / config),
            "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(free_port()),
            "-m", "fdtrain", *args]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "fdtrain", *args]


def run(cmd: list[str], timeout: float = 600, **env_extra: str) -> subprocess.CompletedProcess:
    """Run to completion; the output is kept for the assertion message."""
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a launched process and its children (only what this test started)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        for child in parent.children(recursive=True):
            child.send_signal(sig)
        parent.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def load_state_dict(ckpt: Path) -> dict:
    import torch

    return torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state between in-process runs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def trained_run(data: Path, root: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(data folder, run folder, the finished process) of one short single-process training run on
    ``data`` through ``python -m fdtrain train``, in ``root``: 3 epochs of 16 steps, validation at
    each epoch end, reconstruction panels every 8 steps. The ``trained_run`` fixture runs it once a session."""
    recipe = root / "tiny.yaml"
    recipe.write_text("run: {name: tiny}\n")
    proc = run(fdtrain_cmd("train", str(recipe), *overrides(data, root / "runs", "tiny", **{"train.epochs": 3})))
    return data, root / "runs" / "tiny", proc


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar in a run's TensorBoard events (all event files: resumed runs add one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


def in_process(cfg, keys: list | None = None) -> int:
    """Trainer.fit() in this process (the hook records each batch's step and keys)."""
    from fdtrain.engine.trainer import Trainer

    reset_accelerate()
    trainer = Trainer(cfg)
    if keys is not None:
        trainer.on_batch = lambda step, batch: keys.append((step, tuple(batch["key"])))
    try:
        return trainer.fit()
    finally:
        trainer.close()
        trainer.lock.release()  # as fdtrain.engine.trainer.train does: the next in-process run may reuse the folder
        trainer.acc.end_training()
        reset_accelerate()


def kill_after_first_checkpoint(cmd: list[str], ckpt_dir: Path, timeout: float = 600) -> int:
    """Start a training command, SIGKILL it (and its children) as soon as its first complete
    checkpoint appears; returns the newest complete checkpoint's step at that moment."""
    from fdtrain.model_file import list_checkpoints

    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found = wait_for(lambda: bool(list_checkpoints(ckpt_dir)), timeout=timeout, proc=proc)
        alive = proc.poll() is None
        kill_tree(proc)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert found and alive, f"no checkpoint before the run ended (exit {proc.returncode}):\n{out[-4000:]}"
    return list_checkpoints(ckpt_dir)[-1][0]
