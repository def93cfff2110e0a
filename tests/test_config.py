"""Config loader: merge order, errors that name the key, and the resolved-YAML round trip."""
import re
import subprocess
import sys

import pytest
import yaml

from fdtrain.config import Config, ConfigError, field_docs, from_dict, load_recipe_dict, parse_overrides, resolve


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_have_docs():
    docs = field_docs(Config)
    assert "optim.lr" in docs and "model.fusion" in docs
    missing = [k for k, (_, _, doc) in docs.items() if not doc]
    assert not missing, f"fields without a doc line: {missing}"


def test_merge_order_defaults_base_recipe_cli(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", {"optim": {"lr": 1e-3, "warmup_steps": 5}, "data": {"batch_size": 8}})
    write(tmp_path / "sub" / "mid.yaml", {"base": "../base.yaml", "optim": {"lr": 5e-4}, "run": {"name": "mid"}})
    recipe = write(tmp_path / "sub" / "top.yaml", {"base": "mid.yaml", "data": {"batch_size": 4}})
    cfg = resolve(recipe, ["--data.batch_size=2", "--run.name", "cli"])
    assert cfg.optim.lr == 5e-4  # mid beats base
    assert cfg.optim.warmup_steps == 5  # from base
    assert cfg.data.batch_size == 2  # cli beats recipe
    assert cfg.run.name == "cli"
    assert cfg.optim.weight_decay == 1e-5  # default survives


def test_multiple_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", {"optim": {"lr": 1.0, "eps": 1e-6}})
    write(tmp_path / "b.yaml", {"optim": {"lr": 2.0}})
    recipe = write(tmp_path / "r.yaml", {"base": ["a.yaml", "b.yaml"]})
    cfg = resolve(recipe)
    assert cfg.optim.lr == 2.0 and cfg.optim.eps == 1e-6


def test_type_conversion_of_overrides():
    cfg = resolve(None, [
        "--optim.lr=1e-4", "--train.epochs=3", "--model.pretrained=true", "--optim.betas=0.8,0.99",
        "--model.sources=[inva, fake]", "--data.test={cdf: shards/cdf/test}", "--run.name=007",
    ])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.model.pretrained is True
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.model.sources == ["inva", "fake"]
    assert cfg.data.test == {"cdf": "shards/cdf/test"}
    assert cfg.run.name == "007"


@pytest.mark.parametrize("override,needle", [
    (["--model.nonexistent=1"], "model.nonexistent"),
    (["--model.fusoin=add"], "model.fusion"),  # nearest valid key suggested
    (["--optim.lr=abc"], "optim.lr: expected float"),
    (["--train.epochs=1.5"], "train.epochs: expected int"),
    (["--model.pretrained=maybe"], "model.pretrained: expected bool"),
    (["--model.fusion=concat"], "model.fusion: expected one of"),
    (["--model.sources=inva,bogus"], "model.sources"),
    (["--lr=1"], "must name a section"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        resolve(None, override)


def test_unknown_key_in_recipe_names_it(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*nearest valid key"):
        resolve(recipe)


def test_missing_base_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe_dict(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"base": "nope.yaml"})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_recipe_dict(tmp_path / "c.yaml")


def test_round_trip_resolved_yaml(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"input_size": 224, "fusion": "add"}, "data": {"test": {"a": "x"}}})
    recipe = write(tmp_path / "r.yaml", {"base": "base.yaml", "optim": {"lr": 3e-4}})
    cfg = resolve(recipe, ["--model.sources=real,fake"])
    cfg.save(tmp_path / "out" / "config.yaml")
    again = resolve(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert from_dict(cfg.to_dict()) == cfg


def test_parse_overrides_nested():
    assert parse_overrides(["--a.b=1", "--a.c", "x"]) == {"a": {"b": "1", "c": "x"}}
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--a.b"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fdtrain", *args], capture_output=True, text=True)


def test_cli_help_lists_subcommands():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "evaluate", "predict", "shards", "synth", "bench"):
        assert cmd in r.stdout


def test_cli_train_rejects_bad_overrides(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"run": {"name": "x"}})
    r = cli("train", str(recipe), "--model.nonexistent=1")
    assert r.returncode != 0 and "model.nonexistent" in r.stderr
    r = cli("train", str(recipe), "--optim.lr=abc")
    assert r.returncode != 0 and "optim.lr" in r.stderr and "float" in r.stderr


def test_cli_print_config_round_trips(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"optim": {"lr": 0.5}})
    r = cli("train", str(recipe), "--print-config", "--train.epochs=2")
    assert r.returncode == 0, r.stderr
    saved = tmp_path / "resolved.yaml"
    saved.write_text(r.stdout)
    assert resolve(saved) == resolve(recipe, ["--train.epochs=2"])


@pytest.mark.parametrize("override,message", [
    ("--run.name=../../x", "run.name: '../../x' must be one folder name inside run.out_dir"),
    ("--run.name=..", "run.name: '..' must be one folder name"),
    ("--logging.every_steps=0", "logging.every_steps: must be >= 1"),
    ("--eval.every_steps=-5", "eval.every_steps: must be >= 0, got -5"),
    ("--checkpoint.every_steps=-1", "checkpoint.every_steps: must be >= 0"),
    ("--logging.image_every=-1", "logging.image_every: must be >= 0"),
    ("--train.epochs=0", "train.epochs: must be >= 1"),
    ("--train.epochs=-2", "train.epochs: must be >= 1"),
])
def test_values_that_cannot_run_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(None, [override])


def test_base_must_name_recipes(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"base": 5})
    with pytest.raises(ConfigError, match=r"r.yaml: base: expected a recipe path or a list of them, got 5"):
        resolve(recipe)
    assert resolve(None, ["--train.epochs=0", "--train.max_steps=10"]).train.max_steps == 10


def test_cli_run_name_cannot_leave_out_dir(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"run": {"name": "x", "out_dir": str(tmp_path / "runs")}})
    r = cli("train", str(recipe), "--run.name=../../escaped")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"fdtrain: config error: run.name: '../../escaped' must be one folder name inside run.out_dir "
        f"({tmp_path / 'runs'}): no '/', not '.' or '..'"]
    assert not (tmp_path.parent / "escaped").exists()


# One rule, one place: each section's validate() owns its fields' rules. The same message comes
# from a recipe override, from the section built in code, and from the component that takes it.
SECTION_RULES = [  # (override, message)
    ("--run.nccl_timeout_s=0", "run.nccl_timeout_s: must be > 0 seconds, got 0"),
    ("--model.input_size=16", "model.input_size: Xception needs at least 32 px, got 16"),
    ("--model.dropout=1.0", "model.dropout: a probability in [0, 1), got 1.0"),
    ("--model.fusion_reduction=0", "model.fusion_reduction: must be >= 1, got 0"),
    ("--model.sources=inva,inva", "model.sources: repeated entries in ['inva', 'inva']"),
    ("--loss.flooding=-0.5", "loss.flooding: must be >= 0, got -0.5"),
    ("--data.noise_p=1.5", "data.noise_p: a probability in [0, 1], got 1.5"),
    ("--data.eval_batch_size=0", "data.eval_batch_size: must be > 0, got 0"),
    ("--optim.betas=0.9", "optim.betas: two values, got [0.9]"),
    ("--optim.decay_every=0", "optim.decay_every: must be > 0, got 0"),
    ("--train.grad_accum=0", "train.grad_accum: must be > 0, got 0"),
    ("--eval.paper=[cdf auc]", "eval.paper: entries are 'SET METRIC VALUE'"),
    ("--eval.robustness.types=XX", "eval.robustness: unknown distortion type(s) ['XX']"),
    ("--logging.every_steps=0", "logging.every_steps: must be >= 1"),
    ("--checkpoint.keep_last=-1", "checkpoint.keep_last: must be >= 0, got -1"),
]


@pytest.mark.parametrize("override,message", SECTION_RULES, ids=[o.split("=")[0][2:] for o, _ in SECTION_RULES])
def test_each_section_validates_its_own_fields(override, message):
    from fdtrain.config import _coerce, _hints

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(None, [override])
    # the section alone, with the same (type-checked) value, says the same
    key = override[2:].split("=", 1)[0]
    *path, name = key.split(".")
    section, raw = Config(), parse_overrides([override])
    for p in path:
        section, raw = getattr(section, p), raw[p]
    setattr(section, name, _coerce(raw[name], _hints(type(section))[name], key))
    with pytest.raises(ConfigError, match=re.escape(message)):
        section.validate()


def test_sections_built_in_code_check_their_literal_choices():
    from fdtrain.config import LossConfig, ModelConfig

    with pytest.raises(ConfigError, match=re.escape("model.forward: expected one of ['fused', 'two_pass', 'fused_exa")):
        ModelConfig(forward="fast").validate()
    with pytest.raises(ConfigError, match=re.escape("loss.recon: expected one of ['l1', 'mse'], got 'l2'")):
        LossConfig(recon="l2").validate()


def test_components_apply_their_sections_rules_and_defaults():
    """create_model and FakeDifferLoss take a section (or its fields): the section's rule refuses,
    with the section's message, and an unset field takes the section's default."""
    import dataclasses

    from fdtrain.config import LossConfig
    from fdtrain.losses import FakeDifferLoss
    from fdtrain.models import create_model

    with pytest.raises(ConfigError, match=re.escape("model.input_size: Xception needs at least 32 px, got 16")):
        create_model(input_size=16)
    with pytest.raises(ConfigError, match=re.escape("loss.flooding: must be >= 0, got -1.0")):
        FakeDifferLoss(flooding=-1.0)
    loss = FakeDifferLoss(LossConfig(lambda_r=0.3), flooding=0.04)
    want = dataclasses.replace(LossConfig(), lambda_r=0.3, flooding=0.04)
    assert (loss.lambda_r, loss.lambda_f, loss.recon, loss.flooding, loss.recon_reduction) == (
        want.lambda_r, want.lambda_f, want.recon, want.flooding, want.recon_reduction)


@pytest.mark.parametrize("overrides,message", [
    (["--eval.select_on=test"], "eval.select_on=test but data.test names no test set"),
    (["--eval.select_on=test", "--data.test={cdf: a}", "--eval.select_test=wdf"],
     "eval.select_test: 'wdf' is not in data.test (['cdf'])"),
])
def test_rules_across_sections_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(None, overrides)
    ok = resolve(None, ["--eval.select_on=test", "--data.test={cdf: a, wdf: b}", "--eval.select_test=wdf"])
    assert ok.eval.select_test == "wdf"
