"""`fdtrain report RUN_DIR...`: mean ± std over runs (seeds) of each test set's metrics, as Markdown.

Each run folder holds ``metrics.json`` (the trainer's final test report, with its fingerprint) and
``config.yaml`` (the resolved config). Runs are grouped by recipe (``run.name``, which every recipe
sets and `slurm/seeds.sbatch` keeps, putting each seed in its own ``run.out_dir``) or by any dotted
config key. For each group and test set: n, and mean ± sample std (ddof 1) of frame and video AUC,
Acc and EER in %, with the paper's number beside it where the recipe states one (``eval.paper``).
A group whose runs differ in code (git commit, dirty flag, fdtrain version), in data (a shard
manifest hash) or in config beyond the seed and placement gets a warning. No torch needed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS = ("auc", "acc", "eer")
LEVELS = ("frame", "video")
# run.* keys that legitimately differ between the seeds of one experiment
PER_RUN_KEYS = ("run.seed", "run.name", "run.out_dir", "run.resume", "run.device")


class ReportError(ValueError):
    """A run folder that cannot be reported; the message names the file."""


def load_run(run_dir: str | Path) -> dict[str, Any]:
    import yaml

    run_dir = Path(run_dir)
    mfile, cfile = run_dir / "metrics.json", run_dir / "config.yaml"
    if not mfile.is_file():
        raise ReportError(f"{run_dir}: no metrics.json (is it a finished fdtrain run folder?)")
    try:
        metrics = json.loads(mfile.read_text())
    except ValueError as e:
        raise ReportError(f"{mfile}: not valid JSON ({e})") from e
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        raise ReportError(f"{mfile}: no 'test' results (written by `fdtrain train` at the end of a run)")
    config = {}
    if cfile.is_file():
        try:
            config = yaml.safe_load(cfile.read_text()) or {}
        except yaml.YAMLError as e:
            raise ReportError(f"{cfile}: not valid YAML ({e})") from e
    return {"dir": str(run_dir), "metrics": metrics, "config": config}


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not (prefix == "data." and k == "test"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def group_key(run: dict[str, Any], by: str) -> str:
    key = "run.name" if by == "recipe" else by
    cfg = flat(run["config"])
    if key in cfg:
        return str(cfg[key])
    if key == "run.name" and run["metrics"].get("run"):
        return str(run["metrics"]["run"])
    raise ReportError(f"{run['dir']}: config.yaml has no key '{key}' to group by")


def paper_numbers(config: dict[str, Any]) -> dict[tuple[str, str], float]:
    """{(set, metric): value %} from the recipe's eval.paper entries ('SET METRIC VALUE')."""
    out = {}
    for entry in (config.get("eval") or {}).get("paper") or []:
        name, metric, value = str(entry).split()
        out[(name, metric)] = float(value)
    return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{"sets": {set: {level: {metric: (mean %, std %, n)}}}, "paper": ..., "warnings": [...]}"""
    sets: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for name, levels in run["metrics"]["test"].items():
            for level in LEVELS:
                for metric in METRICS:
                    v = (levels.get(level) or {}).get(metric)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        sets.setdefault(name, {}).setdefault(level, {}).setdefault(metric, []).append(100.0 * v)
    stats = {s: {lvl: {m: mean_std(vals) for m, vals in ms.items()} for lvl, ms in lv.items()}
             for s, lv in sets.items()}
    return {"sets": stats, "paper": paper_numbers(runs[0]["config"]), "warnings": group_warnings(runs)}


def group_warnings(runs: list[dict[str, Any]]) -> list[str]:
    from fdtrain.fingerprint import code_key, data_key

    out = []
    fps = [r["metrics"].get("fingerprint") for r in runs]
    missing = [r["dir"] for r, fp in zip(runs, fps) if not fp]
    if missing:
        out.append(f"no fingerprint in metrics.json of {missing} (made before fingerprints were recorded)")
    have = [(r, fp) for r, fp in zip(runs, fps) if fp]
    checks = (("code (git commit, dirty flag, fdtrain version)", code_key), ("data (shard manifests)", data_key))
    for what, key in checks:
        kinds: dict[tuple, list[str]] = {}
        for r, fp in have:
            kinds.setdefault(key(fp), []).append(r["dir"])
        if len(kinds) > 1:
            out.append(f"runs differ in {what}: " + "; ".join(f"{_short(k)}: {v}" for k, v in kinds.items()))
    dirty = [r["dir"] for r, fp in have if (fp.get("git") or {}).get("dirty")]
    if dirty:
        out.append(f"made from a modified checkout (git dirty): {dirty}")
    configs = [{k: v for k, v in flat(r["config"]).items() if k not in PER_RUN_KEYS} for r in runs]
    differ = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    if differ:
        out.append(f"configs differ beyond the seed in: {differ}")
    return out


def _short(key: tuple) -> str:
    return ", ".join(str(x)[:12] if not isinstance(x, tuple) else f"{x[0]}={str(x[1])[:12]}" for x in key)


def _cell(stat: tuple[float, float, int] | None, paper: float | None) -> str:
    if stat is None or stat[2] == 0:
        text = "-"
    elif stat[2] == 1:
        text = f"{stat[0]:.2f}"
    else:
        text = f"{stat[0]:.2f} ± {stat[1]:.2f}"
    return f"{text} (paper {paper:.2f})" if paper is not None else text


def to_markdown(groups: dict[str, list[dict[str, Any]]], by: str) -> tuple[str, list[str]]:
    lines = ["# fdtrain report", "",
             f"Runs grouped by {'recipe (run.name)' if by == 'recipe' else by}. Each cell: mean ± sample std "
             "(ddof 1) over the group's n runs, in %; the paper's frame-level number beside it where the "
             "recipe states one (eval.paper).", ""]
    warnings = []
    for name, runs in groups.items():
        summary = summarize(runs)
        lines += [f"## {name}", "", f"{len(runs)} run(s): " + ", ".join(f"`{r['dir']}`" for r in runs), ""]
        for w in summary["warnings"]:
            lines.append(f"> **warning:** {w}")
            warnings.append(f"{name}: {w}")
        if summary["warnings"]:
            lines.append("")
        head = "| test set | level | n | " + " | ".join(m.upper() for m in METRICS) + " |"
        lines += [head, "|" + "---|" * (3 + len(METRICS))]
        paper = summary["paper"]
        set_names = list(summary["sets"]) + sorted({s for s, _ in paper} - set(summary["sets"]))
        for s in set_names:
            for level in LEVELS:
                stats = summary["sets"].get(s, {}).get(level, {})
                if not stats and not (level == "frame" and any(k[0] == s for k in paper)):
                    continue
                n = max((st[2] for st in stats.values()), default=0)
                cells = [_cell(stats.get(m), paper.get((s, m)) if level == "frame" else None) for m in METRICS]
                lines.append(f"| {s} | {level} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines), warnings


def report(run_dirs: list[str], by: str = "recipe") -> tuple[str, list[str]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        run = load_run(d)
        groups.setdefault(group_key(run, by), []).append(run)
    return to_markdown(groups, by)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders (with metrics.json)")
    p.add_argument("--by", default="recipe",
                   help="group by 'recipe' (run.name) or any dotted config key, e.g. model.fusion")
    p.add_argument("--out", default="", help="also write the Markdown here")


def run_report(args: argparse.Namespace) -> int:
    try:
        text, warnings = report(args.runs, args.by)
    except ReportError as e:
        print(f"fdtrain report: {e}", file=sys.stderr)
        return 2
    print(text)
    for w in warnings:
        print(f"fdtrain report: warning: {w}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
