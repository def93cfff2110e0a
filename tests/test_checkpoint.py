"""Checkpoints: layout, round trip, pruning, atomicity (a kill -9 mid-write leaves the previous one)."""
import json
import signal
import subprocess

import pytest
import torch

from fdtrain import model_file as mf
from fdtrain.config import from_dict
from fdtrain.engine import checkpoint as ck
from tests import _engine_utils as U


@pytest.fixture()
def setup(tmp_path):
    """A real 64-px FakeDiffer, its Adam and schedule under a single-process CPU Accelerator."""
    from accelerate import Accelerator

    from fdtrain.engine.optim import build_optimizer, build_scheduler
    from fdtrain.models import create_model_from_config

    U.reset_accelerate()
    cfg = from_dict({"model": {"input_size": 64}, "run": {"name": "ck", "out_dir": str(tmp_path)}})
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = create_model_from_config(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 100)
    model, opt = acc.prepare(model, opt)
    yield cfg, acc, model, opt, sched
    U.reset_accelerate()


def _train_a_step(model, opt, sched):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x, x, labels=torch.tensor([0.0, 1.0]))
    (out.logit.sum() + out.recon_real.mean()).backward()
    opt.step()
    opt.zero_grad()
    sched.step()


class _State:
    """A stateful component as the checkpointer sees one: the loader's position (state_dict,
    load_state_dict, set_epoch), or a part of the trainer state (a count here)."""

    def __init__(self, **state):
        self.state = state

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, sd):
        self.state = {k: sd[k] for k in self.state}

    def set_epoch(self, epoch):
        self.state = {"epoch": epoch, "step_in_epoch": 0}


def _checkpointer(ckpt_dir, setup, **checkpoint):
    """A Checkpointer of the setup's components; ``checkpoint`` overrides fields of cfg.checkpoint."""
    import dataclasses

    cfg, acc, model, opt, sched = setup
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **checkpoint))
    return ck.Checkpointer(ckpt_dir, acc, model=model, optimizer=opt, scheduler=sched,
                           loader=_State(epoch=0, step_in_epoch=0), config=cfg, parts=[_State(seen=0)])


def _save(ckpt, step, **kw):
    ckpt.loader.state = {"epoch": 0, "step_in_epoch": step}
    ckpt.parts[0].state = {"seen": 10 * step}
    return ckpt.save(step, 0, kw.get("metrics", {}))


def test_layout_and_plain_torch_loading(setup, tmp_path):
    from fdtrain.inference import load_model

    cfg, acc, model, opt, sched = setup
    _train_a_step(model, opt, sched)
    ckpt = _checkpointer(tmp_path / "checkpoints", setup)
    path = _save(ckpt, 1, metrics={"val": {"frame": {"auc": 0.75}}})
    assert path.name == "step-00000001"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.pt", "rank-00000.pt", "train_state.pt"]
    blob = torch.load(path / "model.pt", map_location="cpu", weights_only=True)  # plain tensors only
    assert set(blob) >= {"format", "config", "state_dict", "step", "epoch", "metrics"}
    assert blob["step"] == 1 and blob["metrics"]["val"]["frame"]["auc"] == 0.75
    assert all(v.dtype == torch.float32 for v in blob["state_dict"].values() if v.is_floating_point())
    loaded, loaded_cfg = load_model(path)  # fdtrain.inference: no Accelerate involved
    assert loaded_cfg.model.input_size == 64
    for k, v in acc.unwrap_model(model).state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert json.loads((path / "meta.json").read_text())["world_size"] == 1


def test_round_trip_restores_optimizer_scheduler_rng(setup, tmp_path):
    cfg, acc, model, opt, sched = setup
    for _ in range(2):
        _train_a_step(model, opt, sched)
    ckpt = _checkpointer(tmp_path / "checkpoints", setup)
    path = _save(ckpt, 2)
    expected_rand = torch.rand(3)  # the RNG stream right after the save
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    _train_a_step(model, opt, sched)  # move everything away from the saved state

    ckpt.loader.state, ckpt.parts[0].state = {"epoch": 5, "step_in_epoch": 9}, {"seen": -1}
    state = ckpt.load(path)
    assert state["step"] == 2 and state["loader"] and ckpt.loader.state == {"epoch": 0, "step_in_epoch": 2}
    assert ckpt.parts[0].state == {"seen": 20} and state["trainer"]["seen"] == 20
    assert torch.equal(torch.rand(3), expected_rand)
    assert sched.last_epoch == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], exp_avg[k])


def test_keeps_last_k_plus_best_and_ignores_partial_writes(setup, tmp_path):
    cfg, acc, model, opt, sched = setup
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    stale = ckpt_dir / ".tmp-step-00000099"  # what a crash mid-write leaves
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half a file")
    assert mf.newest_checkpoint(ckpt_dir) is None
    ckpt = _checkpointer(ckpt_dir, setup, keep_last=2)
    assert not stale.exists()  # cleaned when the next run starts

    for step in (1, 2, 3, 4):
        path = _save(ckpt, step)
        if step == 2:
            ckpt.mark_best(path, {"value": 0.9, "step": 2})
        ckpt.prune()
    assert [s for s, _ in mf.list_checkpoints(ckpt_dir)] == [2, 3, 4]  # last 2 + the best
    assert mf.best_checkpoint(ckpt_dir).name == "step-00000002"
    assert json.loads((ckpt_dir / "best.json").read_text())["checkpoint"] == "step-00000002"
    assert mf.newest_checkpoint(ckpt_dir).name == "step-00000004"
    # a run folder, a checkpoints folder or a checkpoint resolve to a model file (best first)
    assert mf.resolve_model_file(tmp_path).parent.name == "step-00000002"
    assert mf.resolve_model_file(ckpt_dir / "step-00000003").parent.name == "step-00000003"
    with pytest.raises(FileNotFoundError, match="no model.pt"):
        mf.resolve_model_file(tmp_path / "nothing")


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(easy_dataset, tmp_path):
    """SIGKILL the trainer while a checkpoint folder is being written: the newest complete one
    still loads (plain torch and --resume auto), and the partial one is ignored, then removed."""
    from fdtrain.inference import load_model

    data = easy_dataset(train_videos=8, eval_videos=2, shards=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: k9}\n")
    args = U.overrides(data, tmp_path / "runs", "k9", **{"train.max_steps": 40, "checkpoint.every_steps": 1,
                                                         "checkpoint.keep_last": 3, "data.val": "",
                                                         "data.test": {}})
    ckpt_dir = tmp_path / "runs" / "k9" / "checkpoints"
    proc = subprocess.Popen(U.fdtrain_cmd("train", str(recipe), *args), cwd=U.REPO, env=U.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def mid_write():
            return bool(mf.list_checkpoints(ckpt_dir)) and any(ckpt_dir.glob(".tmp-step-*"))

        assert U.wait_for(mid_write, timeout=300, proc=proc), proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = list(ckpt_dir.glob(".tmp-step-*"))
    assert partial, "the kill did not land during a write"
    newest = mf.newest_checkpoint(ckpt_dir)
    assert newest is not None and int(partial[0].name.split("-")[2]) > int(newest.name.split("-")[-1])
    model, cfg = load_model(newest)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.load(newest / "train_state.pt", map_location="cpu", weights_only=True)

    step = int(newest.name.split("-")[-1])
    args = [a for a in args if not a.startswith("--train.max_steps")] + [f"--train.max_steps={step + 2}"]
    done = U.run(U.fdtrain_cmd("train", str(recipe), *args, "--resume", "auto"), timeout=600)
    assert done.returncode == 0, U.explain(done)
    assert f"resumed from {newest}" in done.stdout
    assert not list(ckpt_dir.glob(".tmp-step-*"))
    assert mf.newest_checkpoint(ckpt_dir).name == f"step-{step + 2:08d}"


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_and_damaged_files_are_refused_without_running_code(setup, tmp_path):
    """Every file of a checkpoint is read with weights_only=True: a pickle that would run a shell
    command is refused (the command never runs); truncated, empty and foreign files are named."""
    from fdtrain.inference import load_model

    cfg, acc, model, opt, sched = setup
    _train_a_step(model, opt, sched)
    ckpt = _checkpointer(tmp_path / "checkpoints", setup)
    path = _save(ckpt, 1, metrics={"val": {"frame": {"auc": ck.np.float64(0.5)}}})
    for f in path.glob("*.pt"):  # fdtrain's own files hold only what weights_only accepts
        torch.load(f, map_location="cpu", weights_only=True)
    marker = tmp_path / "pwned"
    good = {f.name: f.read_bytes() for f in path.glob("*.pt")}
    for name in ("train_state.pt", "rank-00000.pt", "model.pt"):
        torch.save({"state_dict": {}, "config": {}, "payload": _RunsCode(marker)}, path / name)
        with pytest.raises(mf.CheckpointError, match=rf"{name}: refused: unpickling it would import \S*system"):
            if name == "model.pt":
                load_model(path)
            else:
                ckpt.load(path)
        (path / name).write_bytes(good[name])
    assert not marker.exists(), "unpickling the crafted file ran its command"

    model_pt = path / "model.pt"
    cases = {b"": "empty file", good["model.pt"][: len(good["model.pt"]) // 2]: "truncated or not a torch file"}
    for data, why in cases.items():
        model_pt.write_bytes(data)
        with pytest.raises(mf.CheckpointError, match=f"model.pt: .*{why}"):
            load_model(path)
    torch.save({"conv.weight": torch.zeros(2)}, model_pt)  # a foreign state dict, e.g. timm's
    with pytest.raises(mf.CheckpointError, match="model.pt: not an fdtrain model file: no 'config'"):
        load_model(path)
