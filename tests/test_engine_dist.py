"""Two real CPU processes (gloo): accelerate launch, torchrun, and DeepSpeed ZeRO-2 through
Accelerate. Every rank takes the same steps and ends with the same weights; the distributed
evaluation equals a single-process `fdtrain evaluate` of the same checkpoint; DeepSpeed
checkpoints resume and consolidate to a plain state dict.

The launch configs are the project's own (launch/accelerate/cpu2.yaml, zero2.yaml with
launch/deepspeed/zero2.json), with --num_processes 2. The first DeepSpeed start JIT-compiles a
shared-memory op (40-60 s, cached in ~/.cache/torch_extensions).
"""
import json

import pytest
import torch

from fdtrain import model_file as mf
from fdtrain.engine import checkpoint as ck
from tests import _engine_utils as U

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def data(easy_dataset):
    return easy_dataset()


def _recipe(tmp_path, name):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"run: {{name: {name}}}\n")
    return recipe


def _check_ranks_agree(run_dir, steps):
    ranks = U.metrics(run_dir)["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["step"] for r in ranks] == [steps, steps]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"], ranks  # identical weights


def _check_single_process_evaluation(run_dir, data, tmp_path):
    """`fdtrain evaluate` of the checkpoint the run evaluated == the run's own 2-rank evaluation."""
    m = U.metrics(run_dir)
    ckpt = run_dir / "checkpoints" / m["evaluated"].split()[0]
    out = tmp_path / "single.json"
    proc = U.run(U.fdtrain_cmd("evaluate", "--checkpoint", str(ckpt), "--data", str(data / "test"), "--out", str(out)))
    assert proc.returncode == 0, U.explain(proc)
    single = json.loads(out.read_text())["results"]["test"]
    for level in ("frame", "video"):
        for k, v in m["test"]["test"][level].items():
            assert single[level][k] == pytest.approx(v, abs=1e-9), (level, k)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_cpu_processes(launcher, data, tmp_path):
    name = f"ddp_{launcher}"
    args = U.overrides(data, tmp_path / "runs", name, **{"train.max_steps": 6, "eval.every_steps": 3})
    recipe = str(_recipe(tmp_path, name))
    cmd = (U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", recipe, *args) if launcher == "accelerate"
           else U.torchrun_cmd("train", recipe, *args))
    proc = U.run(cmd)
    assert proc.returncode == 0, U.explain(proc)
    assert "on 2 x cpu" in proc.stdout and "MULTI_CPU" in proc.stdout  # two processes, not one
    run_dir = tmp_path / "runs" / name
    _check_ranks_agree(run_dir, 6)
    newest = mf.newest_checkpoint(run_dir / "checkpoints")
    assert {p.name for p in newest.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    assert json.loads((newest / "meta.json").read_text())["world_size"] == 2
    _check_single_process_evaluation(run_dir, data, tmp_path)


def test_deepspeed_zero2_save_resume_and_consolidate(data, tmp_path):
    from fdtrain.inference import load_model

    name = "zero2"
    recipe = str(_recipe(tmp_path, name))
    args = U.overrides(data, tmp_path / "runs", name, **{"train.max_steps": 4, "eval.every_steps": 2})
    proc = U.run(U.accelerate_cmd("launch/accelerate/zero2.yaml", "train", recipe, *args), timeout=900)
    assert proc.returncode == 0, U.explain(proc)
    assert "DEEPSPEED" in proc.stdout and "on 2 x cpu" in proc.stdout
    run_dir = tmp_path / "runs" / name
    _check_ranks_agree(run_dir, 4)

    first = mf.newest_checkpoint(run_dir / "checkpoints")
    assert first.name == "step-00000004"
    ds = first / "deepspeed" / "state"
    assert {p.name for p in ds.iterdir()} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                              "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    plain = U.load_state_dict(first)  # model.pt: consolidated at save time, fp32, plain keys
    consolidated = ck.consolidate_deepspeed(first / "deepspeed")
    assert U.max_abs_diff(plain, {k: consolidated[k] for k in plain}) == 0.0
    model, _ = load_model(first)  # no DeepSpeed needed to use it
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in consolidated.items()
                                                                if k in dict(model.named_parameters()))

    args = [a for a in args if not a.startswith("--train.max_steps")] + ["--train.max_steps=6"]
    proc = U.run(U.accelerate_cmd("launch/accelerate/zero2.yaml", "train", recipe, *args, "--resume", "auto"),
                 timeout=900)
    assert proc.returncode == 0, U.explain(proc)
    assert f"resumed from {first} at step 4" in proc.stdout
    _check_ranks_agree(run_dir, 6)
    state = torch.load(mf.newest_checkpoint(run_dir / "checkpoints") / "train_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 6 and "optimizer" not in state  # DeepSpeed holds the optimizer
    _check_single_process_evaluation(run_dir, data, tmp_path)
