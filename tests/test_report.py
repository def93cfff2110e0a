"""Fingerprints in metrics.json and evaluate's output; `fdtrain report` over runs of known metrics."""
import json
import re

import pytest
import yaml

from tests import _engine_utils as U


def _metrics(auc: float, acc: float, eer: float) -> dict:
    frame = {"auc": auc, "acc": acc, "eer": eer, "ap": 0.9, "n": 10, "n_real": 5, "n_fake": 5}
    video = {"auc": auc - 0.01, "acc": acc, "eer": eer, "ap": 0.9, "n": 4, "n_real": 2, "n_fake": 2}
    return {"frame": frame, "video": video}


def _make_runs(tmp_path, values, *, data_hashes=None, name="demo"):
    """Run folders with a resolved config.yaml and a metrics.json whose test set 'in_domain' has the
    given (auc, acc, eer) per run, and a fingerprint as the trainer writes it."""
    from fdtrain.config import resolve
    from fdtrain.fingerprint import fingerprint

    dirs = []
    for i, (auc, acc, eer) in enumerate(values):
        cfg = resolve(None, {"run": {"name": name, "seed": i, "out_dir": str(tmp_path / f"seed-{i}")},
                             "data": {"test": {"in_domain": str(tmp_path / "shards" / "test")}},
                             "eval": {"paper": ["in_domain auc 99.52", "in_domain acc 98.04"]}})
        run_dir = tmp_path / f"seed-{i}" / name
        run_dir.mkdir(parents=True)
        cfg.save(run_dir / "config.yaml")
        fp = fingerprint(cfg.to_dict(), {"evaluated": "step-1 (best)", "selected_on": "val"})
        fp["git"] = {"commit": "c" * 40, "dirty": False}  # this checkout may be modified: not under test here
        if data_hashes:
            fp["data"]["test"]["in_domain"]["manifest_sha256"] = data_hashes[i]
        (run_dir / "metrics.json").write_text(json.dumps(
            {"run": name, "test": {"in_domain": _metrics(auc, acc, eer)}, "fingerprint": fp}))
        dirs.append(run_dir)
    return dirs


def _row(md: str, set_name: str, level: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [set_name, level]:
            return cells
    raise AssertionError(f"no row {set_name}/{level} in\n{md}")


def test_report_mean_std_and_paper_numbers(tmp_path, capsys):
    from fdtrain.cli import main

    dirs = _make_runs(tmp_path, [(0.90, 0.80, 0.10), (0.92, 0.84, 0.12), (0.97, 0.85, 0.08)])
    out = tmp_path / "report.md"
    assert main(["report", *map(str, dirs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    md = out.read_text()
    assert md.strip() == captured.out.strip() and "## demo" in md and "3 run(s)" in md
    # AUC 90, 92, 97 -> mean 93.00, sample std 3.61; Acc 80, 84, 85 -> 83.00 +- 2.65; EER 10, 12, 8 -> 10 +- 2
    assert _row(md, "in_domain", "frame") == ["in_domain", "frame", "3", "93.00 ± 3.61 (paper 99.52)",
                                              "83.00 ± 2.65 (paper 98.04)", "10.00 ± 2.00"]
    assert _row(md, "in_domain", "video")[3] == "92.00 ± 3.61"  # no paper number at video level
    assert "warning" not in md and "warning" not in captured.err


def test_report_warns_on_fingerprint_mismatch_and_groups_by_key(tmp_path, capsys):
    from fdtrain.cli import main

    dirs = _make_runs(tmp_path, [(0.9, 0.8, 0.1)] * 3, data_hashes=["a" * 64, "a" * 64, "b" * 64])
    other = _make_runs(tmp_path / "other", [(0.6, 0.6, 0.4)], name="xmanip")
    fp_file = other[0] / "metrics.json"
    m = json.loads(fp_file.read_text())
    m["fingerprint"]["git"] = {"commit": "0" * 40, "dirty": False}
    fp_file.write_text(json.dumps(m))
    assert main(["report", *map(str, dirs + other)]) == 0
    captured = capsys.readouterr()
    demo_part = captured.out.split("## xmanip")[0]
    assert "## demo" in demo_part and re.search(r"warning:\*\* runs differ in data \(shard manifests\)", demo_part)
    assert "xmanip: " not in captured.err and "demo: runs differ in data" in captured.err
    # grouped by a config key instead: the xmanip run joins them, and its code differs
    assert main(["report", *map(str, dirs + other), "--by", "model.variant"]) == 0
    captured = capsys.readouterr()
    assert "## fakediffer" in captured.out and "4 run(s)" in captured.out
    assert "runs differ in code" in captured.err and "runs differ in data" in captured.err


def test_report_bad_run_folders_are_clear_errors(tmp_path, capsys):
    from fdtrain.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope: no metrics.json" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.json").write_text("{}")
    assert main(["report", str(tmp_path / "half")]) == 2
    assert "no 'test' results" in capsys.readouterr().err
    dirs = _make_runs(tmp_path / "ok", [(0.9, 0.8, 0.1)])
    assert main(["report", str(dirs[0]), "--by", "model.nosuchkey"]) == 2
    assert "model.nosuchkey" in capsys.readouterr().err


def test_paper_numbers_have_one_owner_the_recipes(tmp_path):
    """The README's recipe table quotes eval.paper of each recipe it names; nothing else holds them."""
    from fdtrain.config import resolve

    readme = (U.REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `paper/") and "ablation" not in line]
    assert len(rows) >= 13
    for row in rows:
        first, _, paper = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([\w/]+\.yaml)`", first)
        recipes = [U.REPO / "recipes" / (n if n.startswith("paper/") else f"paper/{n}") for n in names]
        values = {float(v) for r in recipes for v in (e.split()[2] for e in resolve(r).eval.paper)}
        quoted = {float(v) for v in re.findall(r"\d+\.\d+", paper)}
        assert quoted == values, f"README row {first}: {sorted(quoted)} vs recipes' eval.paper {sorted(values)}"
    for recipe in (U.REPO / "recipes" / "paper").rglob("*.yaml"):
        header = "".join(line for line in recipe.read_text().splitlines(True) if line.startswith("#"))
        assert not re.search(r"\d\d\.\d\d", header), f"{recipe}: paper numbers in comments (eval.paper owns them)"


def test_metrics_json_and_evaluate_carry_fingerprints(trained_run):
    from fdtrain.engine.evaluate import evaluate_checkpoint
    from fdtrain.fingerprint import config_hash, sha256_file

    data, run_dir, proc = trained_run
    assert proc.returncode == 0, U.explain(proc)
    fp = U.metrics(run_dir)["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{40}", fp["git"]["commit"]) and isinstance(fp["git"]["dirty"], bool)
    assert fp["fdtrain_version"] and fp["selection"]["selected_on"] == "val" and "evaluated" in fp["selection"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert fp["config_sha256"] == config_hash(config)
    assert fp["data"]["train"]["manifest_sha256"] == sha256_file(data / "train" / "manifest.json")
    assert fp["data"]["test"]["test"]["manifest_sha256"] == sha256_file(data / "test" / "manifest.json")
    report = evaluate_checkpoint(run_dir, data / "test", max_batches=1)
    efp = report["fingerprint"]
    assert efp["config_sha256"] == fp["config_sha256"] and efp["git"] == fp["git"]
    assert efp["evaluated_data"]["test"]["manifest_sha256"] == fp["data"]["test"]["test"]["manifest_sha256"]
    assert efp["selection"]["evaluated"].endswith("(best)") and efp["selection"]["metric"] == "auc"
    assert efp["checkpoint_sha256"] == sha256_file(report["checkpoint"])


def test_git_state_without_git_is_null(tmp_path):
    from fdtrain.fingerprint import git_state

    assert git_state(tmp_path) == {"commit": None, "dirty": None}


@pytest.mark.parametrize("entry", ["celebdf auc", "celebdf f1 70.0", "celebdf auc high"])
def test_eval_paper_entries_are_checked(entry):
    from fdtrain.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="eval.paper"):
        resolve(None, {"eval": {"paper": [entry]}})
