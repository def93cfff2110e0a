"""Recipes, accelerate configs and the DeepSpeed json: each one loads with its owner's own parser.

- every recipe under recipes/ resolves through fdtrain.config.resolve and through the CLI;
- the paper recipes hold the paper's hyper-parameters, name their shards and test sets, and say
  which paper number they aim at; each ablation differs from its setting's recipe in one switch;
- the scale recipes follow the batch / lr rule their comments state;
- launch/accelerate/*.yaml load with Accelerate's loader; launch/deepspeed/zero2.json goes through
  Accelerate's DeepSpeed plugin (which fills its "auto" values) and then DeepSpeed's own config class.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fdtrain.config import resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))
PAPER = sorted((RECIPES / "paper").rglob("*.yaml"))
ABLATIONS = sorted((RECIPES / "paper" / "ablation").rglob("*.yaml"))
ACCEL = ROOT / "launch" / "accelerate"
DS_JSON = ROOT / "launch" / "deepspeed" / "zero2.json"

ABLATION_SETTINGS = ["cross_c23", "loo_df_c23", "loo_df_c40", "loo_f2f_c23", "loo_f2f_c40"]
ABLATION_ROWS = {
    # Table 4
    "real_inf": {"sources": ["real"]},
    "fake_inf": {"sources": ["fake"]},
    "xception": {"variant": "xception"},
    "dual_recons": {"variant": "dual_recons"},
    # Table 5
    "add_real_inva": {"fusion": "add", "sources": ["inva", "real"]},
    "add_fake_inva": {"fusion": "add", "sources": ["inva", "fake"]},
    "add_real_fake": {"fusion": "add", "sources": ["real", "fake"]},
    "add_all": {"fusion": "add"},
    "inter_real_inva": {"sources": ["inva", "real"]},
    "inter_fake_inva": {"sources": ["inva", "fake"]},
    "inter_real_fake": {"sources": ["real", "fake"]},
}
# Every protocol of Tables 1-5 has a main recipe (the ablation rows are checked separately).
MAIN_PAPER = {
    "ffpp_c23", "ffpp_c40", "celebdf", "wdf",  # Table 1
    "cross_ffpp_celebdf", "cross_ffpp_wdf",  # Table 2
    "xmanip_df", "xmanip_f2f", "xmanip_fs", "xmanip_nt",  # Table 3
    "loo_df_c23", "loo_df_c40", "loo_f2f_c23", "loo_f2f_c40", "cross_c23",  # Tables 4-5 settings
}


def _id(p: Path) -> str:
    return str(p.relative_to(RECIPES))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "test":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _header(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


# ------------------------------------------------------------------------------------------ all
@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=_id)
def test_every_recipe_resolves(recipe):
    cfg = resolve(recipe)
    assert _header(recipe).strip(), f"{_id(recipe)}: starts with no comment saying what it is"
    if recipe.name == "base.yaml":  # the shared base names no data on purpose
        return
    assert cfg.run.name and cfg.run.name != "run", f"{_id(recipe)}: give the run its own name"
    assert cfg.data.train and cfg.data.test, f"{_id(recipe)}: names no training or test shards"


def test_run_names_are_unique():
    names: dict[str, str] = {}
    for r in ALL_RECIPES:
        if r.name == "base.yaml":
            continue
        name = resolve(r).run.name
        assert name not in names, f"{_id(r)} and {names[name]} both write runs/{name}"
        names[name] = _id(r)


def test_cli_prints_the_resolved_config():
    """The user's check (`fdtrain train RECIPE --print-config`), with an override on top."""
    out = subprocess.run(
        [sys.executable, "-m", "fdtrain", "train", "recipes/paper/wdf.yaml", "--print-config", "--optim.lr=1e-4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "input_size: 224" in out.stdout and "lr: 0.0001" in out.stdout


# ---------------------------------------------------------------------------------------- paper
def test_every_protocol_has_a_recipe():
    have = {p.stem for p in (RECIPES / "paper").glob("*.yaml")}
    assert MAIN_PAPER <= have, f"missing paper recipes: {sorted(MAIN_PAPER - have)}"
    for setting in ABLATION_SETTINGS:
        rows = {p.stem for p in (RECIPES / "paper" / "ablation" / setting).glob("*.yaml")}
        assert rows == set(ABLATION_ROWS), f"ablation/{setting}: rows {sorted(rows ^ set(ABLATION_ROWS))} differ"


@pytest.mark.parametrize("recipe", PAPER, ids=_id)
def test_paper_recipe_holds_the_paper_values(recipe):
    c = resolve(recipe)
    # "30 epochs with a batch size of 32, Adam ... 2e-4 ... warmup step of 10,000 ... weight decay 1e-5,
    #  lambda_r and lambda_f 0.1, only random horizontal flipping, random seed 42"
    assert (c.data.batch_size, c.train.epochs, c.train.grad_accum) == (32, 30, 1)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps) == ("adam", 2e-4, 1e-5, 10000)
    assert (c.loss.lambda_r, c.loss.lambda_f) == (0.1, 0.1)
    assert (c.data.flip_p, c.run.seed) == (0.5, 42)
    # released code where the paper is silent (design/model.md)
    assert (c.optim.schedule, c.optim.hold_steps, c.optim.decay_every, c.optim.decay_rate) == (
        "hold_step", 10000, 3000, 0.9)
    assert (c.data.noise_p, c.data.noise_std, c.loss.recon, c.loss.flooding) == (0.5, 1e-6, "l1", 0.04)
    assert (c.train.mixed_precision, c.eval.select_on, c.eval.metric, c.optim.grad_clip) == ("fp16", "val", "auc", 0.0)
    assert c.model.pretrained and c.model.backbone == "legacy_xception"
    # the released training step, exactly (README "Exact vs fast"): two passes, released reduction
    assert (c.model.forward, c.loss.recon_reduction) == ("two_pass", "released"), _id(recipe)
    assert c.model.noisy_views == (1 if c.model.variant == "xception" else 2)
    # the released Celeb-DF/WildDeepfake loaders draw a fake subset once; FF++ is read as RECCE reads it
    own = c.data.train.startswith(("shards/celebdf/", "shards/wdf/"))
    assert c.data.balance == ("subsample_fakes" if own else "none"), _id(recipe)
    assert c.model.input_size == (224 if c.data.train.startswith("shards/wdf/") else 299)
    # names its shards and test sets, and says what to aim at
    for path in [c.data.train, c.data.val, *c.data.test.values()]:
        assert path.startswith("shards/"), f"{_id(recipe)}: shard path {path!r} outside shards/"
    assert re.search(r"^# paper \(Tables? [1-5]", _header(recipe), re.M), f"{_id(recipe)}: no '# paper (Table N' line"
    if recipe.parent.name == "paper":
        assert "# shards:" in _header(recipe), f"{_id(recipe)}: does not say how its shards are made"


@pytest.mark.parametrize("recipe", ABLATIONS, ids=_id)
def test_ablation_changes_one_switch(recipe):
    setting, row = recipe.parent.name, recipe.stem
    main = _flat(resolve(RECIPES / "paper" / f"{setting}.yaml").to_dict())
    abl = _flat(resolve(recipe).to_dict())
    diff = {k: abl[k] for k in abl if abl[k] != main[k] and k not in ("run.name", "eval.paper")}
    assert diff == {f"model.{k}": v for k, v in ABLATION_ROWS[row].items()}


def test_cross_manipulation_trains_on_one_method_and_tests_all_four():
    for m in ("df", "f2f", "fs", "nt"):
        c = resolve(RECIPES / "paper" / f"xmanip_{m}.yaml")
        assert c.data.train == f"shards/ffpp_c40_{m.upper()}/train"
        assert sorted(c.data.test) == ["DF", "F2F", "FS", "NT"]
        assert all(p.startswith("shards/ffpp_c40/test_") for p in c.data.test.values())


def test_leave_one_out_never_trains_on_the_held_out_method():
    for held, comp in [("DF", "c23"), ("DF", "c40"), ("F2F", "c23"), ("F2F", "c40")]:
        recipe = RECIPES / "paper" / f"loo_{held.lower()}_{comp}.yaml"
        c = resolve(recipe)
        method = {"DF": "Deepfakes", "F2F": "Face2Face"}[held]
        assert c.data.train == f"shards/ffpp_{comp}_no{held}/train"
        assert c.data.test == {held: f"shards/ffpp_{comp}/test_{method}"}
        assert f"--methods {method}" not in _header(recipe) and f",{method}" not in _header(recipe)


# ---------------------------------------------------------------------------------- demo, scale
def test_demo_recipe_is_a_cpu_recipe():
    c = resolve(RECIPES / "demo.yaml")
    assert not c.model.pretrained, "the demo must not need downloaded weights"
    assert c.train.mixed_precision == "no" and c.data.backend == "auto"
    assert 64 <= c.model.input_size <= 128 and 8 <= c.data.batch_size <= 32
    assert c.data.train == "shards/demo/train" and c.data.val == "shards/demo/val"
    assert c.data.test == {"in_domain": "shards/demo/test", "NeuralTextures": "shards/demo/test_NeuralTextures"}


@pytest.mark.parametrize("name,gpus", [("node8", 8), ("multinode", 32)])
def test_scale_recipes_follow_their_stated_rule(name, gpus):
    """Per-GPU batch 32; the paper's schedule as written, converted by the engine at the global batch;
    peak lr = 2e-4 sqrt(global/32); validation and checkpoints by steps."""
    from fdtrain.engine.optim import Schedule

    recipe = RECIPES / "scale" / f"{name}.yaml"
    c = resolve(recipe)
    k = gpus  # global batch / paper batch
    assert c.data.batch_size == 32
    o = c.optim
    assert (o.lr, o.warmup_steps, o.hold_steps, o.decay_every, o.reference_batch) == (2e-4, 10000, 10000, 3000, 32)
    assert o.lr_scaling == "sqrt"
    s = Schedule(o, 32 * k, 10**6)
    assert math.isclose(s.peak_lr, 2e-4 * math.sqrt(k), rel_tol=1e-9)
    assert s.in_steps(o.warmup_steps) == 10000 / k and s.in_steps(o.decay_every) == 3000 / k
    head = _header(recipe)
    assert f"{32 * k}" in head, f"{_id(recipe)}: header does not state the global batch {32 * k}"
    assert f"{2e-4 * math.sqrt(k):.2e}".split("e")[0] in head, f"{_id(recipe)}: header does not state the peak lr"
    assert c.train.mixed_precision == "bf16"
    # by steps, not per (short) epoch: the same number of samples between validations at both scales
    assert c.eval.every_steps * 32 * k == c.checkpoint.every_steps * 32 * k == 51200


def test_paper_recipes_define_the_schedule_at_batch_32():
    for recipe in PAPER:
        c = resolve(recipe)
        assert (c.optim.reference_batch, c.optim.lr_scaling) == (32, "none"), _id(recipe)


# ------------------------------------------------------------------------- accelerate, deepspeed
ACCEL_CONFIGS = sorted(ACCEL.glob("*.yaml"))


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    first = path.read_text().splitlines()[0]
    assert first.startswith("# Purpose: "), f"{path.name}: first line should say its purpose"
    cfg = load_config_from_file(str(path))
    expected = {
        "cpu2.yaml": (DistributedType.MULTI_GPU, 2, 1),
        "gpu1.yaml": (DistributedType.NO, 1, 1),
        "gpu8.yaml": (DistributedType.MULTI_GPU, 8, 1),
        "zero2.yaml": (DistributedType.DEEPSPEED, 8, 1),
        "multinode.yaml": (DistributedType.MULTI_GPU, 16, 2),
    }[path.name]
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines) == expected
    # `--cpu` / use_cpu makes accelerate launch start ONE process whatever num_processes says
    assert cfg.use_cpu is False
    assert cfg.mixed_precision in (None, "no"), "precision belongs to the recipe (train.mixed_precision)"
    # a GPU id here makes accelerate set CUDA_VISIBLE_DEVICES over the one SLURM gave the job
    assert cfg.gpu_ids == "all", f"{path.name}: gpu_ids {cfg.gpu_ids!r}"
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file == DS_JSON and ds_file.is_file()
        assert cfg.deepspeed_config.get("deepspeed_multinode_launcher") == "standard"


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_zero2_json_through_accelerate_and_deepspeed(precision, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(DS_JSON.read_text())
    assert raw["zero_optimization"]["stage"] == 2
    assert "optimizer" not in raw and "scheduler" not in raw, "fdtrain builds the optimizer and schedule itself"
    autos = [k for k, v in _flat(raw).items() if v == "auto"]
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"} <= set(autos)

    # what `accelerate launch --config_file launch/accelerate/zero2.yaml` hands to the process
    monkeypatch.chdir(ROOT)
    plugin = DeepSpeedPlugin(hf_ds_config=str(DS_JSON.relative_to(ROOT)))
    assert plugin.zero_stage == 2
    plugin.set_mixed_precision(precision)
    # the values the engine fills from the recipe (fdtrain.engine.accel.configure_deepspeed), one process
    plugin.deepspeed_config_process(must_match=False, train_micro_batch_size_per_gpu=32, train_batch_size=32,
                                    gradient_accumulation_steps=1, gradient_clipping=0.0)
    filled = plugin.deepspeed_config
    left = [k for k, v in _flat(filled).items() if v == "auto"]
    assert not left, f"'auto' values nobody fills: {left}"

    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == 2
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (32, 1, 32)
    assert ds.gradient_clipping == 0.0
    assert (ds.float16_config.enabled, ds.bfloat16_config.enabled) == (precision == "fp16", precision == "bf16")
