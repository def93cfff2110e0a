"""`fdtrain robustness`: the DeeperForensics-1.0 perturbation sweep of a checkpoint on a test set.

Conditions: the clean set, then every (type, level) of ``fdtrain.data.distortions.PROTOCOL``. The
clean row is the evaluation ``fdtrain evaluate`` runs (same loader, same ``evaluate_loader``); every
distorted condition is scored by the same model call and reduced by the same ``MetricAccumulator``
(one gather per condition). Which rank and worker reads what: ``fdtrain.data.loading.sweep_stream``.
Nothing heavy is imported at module level (``fdtrain --help`` stays instant).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdtrain.config import EvalConfig

log = logging.getLogger(__name__)

CLEAN = "clean"


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------
def conditions(types: list[str], levels: list[int]) -> list[tuple[str, int]]:
    return [(t, lv) for t in types for lv in levels]


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    clean: Any  # EvalResult
    distorted: dict[tuple[str, int], Any]  # (type, level) -> EvalResult
    n_samples: int
    seconds_clean: float
    seconds_distorted: float

    def to_json(self) -> dict[str, Any]:
        """{"clean": METRICS, "<type>": {"<level>": METRICS}} with METRICS = {"frame": {...}, "video": {...}}."""
        out: dict[str, Any] = {CLEAN: self.clean.metrics}
        for (t, lv), res in self.distorted.items():
            out.setdefault(t, {})[str(lv)] = res.metrics
        return out


def sweep(model, cfg, folder: str | os.PathLike, conds: list[tuple[str, int]], *, accelerator=None,
          device=None, name: str = "test", threshold: float = EvalConfig.threshold, seed: int = 0,
          num_workers: int | None = None, input_dtype=None, progress: bool = False) -> SweepResult:
    """Score the clean set and every condition; every rank calls it and gets the same metrics."""
    import torch
    from torch.utils.data import DataLoader

    from fdtrain.data.augment import normalize_uint8
    from fdtrain.data.format import open_shards
    from fdtrain.data.loading.sweep_stream import SweepStream, catalog, plan
    from fdtrain.data.loading.torch_loader import worker_batches
    from fdtrain.engine.evaluate import EvalResult, evaluate_folder
    from fdtrain.metrics import MetricAccumulator

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = torch.device(device if device is not None else (accelerator.device if accelerator else "cpu"))
    bar = _bar(len(conds) + 1, enabled=progress and rank == 0)

    # clean: exactly what `fdtrain evaluate` runs
    t0 = time.perf_counter()
    clean = evaluate_folder(model, cfg, name, folder, device=device, accelerator=accelerator, rank=rank, world=world,
                            threshold=threshold, input_dtype=input_dtype)
    seconds_clean = time.perf_counter() - t0
    n_total = len(clean.scores)
    if bar is not None:
        bar.set_postfix_str(f"clean AUC {clean.metrics['frame'].get('auc', float('nan')):.4f}")
        bar.update(1)
    if not conds:
        return SweepResult(clean, {}, n_total, seconds_clean, 0.0)

    t1 = time.perf_counter()
    shards = open_shards(str(folder), name, need_index=False)
    entries = catalog(shards)
    lo, hi = shards.rank_range(rank, world)
    samples, videos = plan(entries, lo, hi)
    if not any(t == "VC" for t, _ in conds):
        videos = []
    workers = cfg.data.num_workers if num_workers is None else num_workers
    n = max(1, min(workers, len(samples)))
    image_parts = [samples[len(samples) * w // n: len(samples) * (w + 1) // n] for w in range(n)]
    video_parts = [videos[w::n] for w in range(n)]
    needed = set(samples) | {i for v in videos for i in v}
    on_device = device.type == "cuda"
    ds = SweepStream({i: entries[i] for i in needed}, image_parts, video_parts, conds, size=cfg.model.input_size,
                     seed=seed, batch=cfg.data.eval_batch_size, on_device=on_device, on_corrupt=cfg.data.on_corrupt)
    dl = DataLoader(ds, batch_size=None, num_workers=n if workers else 0,
                    prefetch_factor=cfg.data.prefetch if workers else None,
                    pin_memory=on_device and cfg.data.pin_memory)
    accs = [MetricAccumulator(threshold=threshold) for _ in conds]
    in_videos = sum(len(v) for v in videos)  # VC: whole videos whose first frame is in this rank's range
    mine = [in_videos if t == "VC" else len(samples) for t, _ in conds]  # this rank's samples per condition
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with contextlib.closing(worker_batches(dl)) as batches:
                for msg in batches:
                    label = msg["label"]
                    for c, x in _condition_batches(msg, conds, cfg.model.input_size, seed, device):
                        x = normalize_uint8(x.to(device, non_blocking=True))
                        if input_dtype is not None:
                            x = x.to(input_dtype)
                        scores = torch.sigmoid(model(x).float())
                        accs[c].update(scores.cpu(), label, list(msg["key"]))
                        if bar is not None:
                            bar.update(len(label) / max(1, mine[c]))
    finally:
        model.train(was_training)
    distorted = {}
    for c, cond in enumerate(conds):  # one gather per condition, in the same order on every rank
        acc = accs[c].gather(accelerator)
        distorted[cond] = EvalResult(f"{cond[0]}/{cond[1]}", acc.compute(), acc.scores, acc.labels, acc.keys or [])
    if bar is not None:
        bar.close()
    return SweepResult(clean, distorted, n_total, seconds_clean, time.perf_counter() - t1)


def _condition_batches(msg: dict[str, Any], conds: list[tuple[str, int]], size: int, seed: int, device):
    """(condition, uint8 batch) pairs of one worker message; raw images are distorted on ``device``."""
    if "x" in msg:
        yield msg["cond"], msg["x"]
        return
    from fdtrain.data.loading.sweep_stream import distort_batch

    imgs = [im.to(device, non_blocking=True) for im in msg["raw"]]
    for c in msg["conds"]:
        yield c, distort_batch(imgs, msg["key"], conds[c], seed, size)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cond", desc="robustness", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total} conditions [{elapsed}<{remaining}{postfix}]")


# --------------------------------------------------------------------------------------------
# Reports: markdown table, plot, TensorBoard
# --------------------------------------------------------------------------------------------
def _auc(metrics: dict, level: str) -> float:
    v = metrics.get(level, {}).get("auc")
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else float("nan")


def _pct(v: float) -> str:
    return f"{100 * v:.2f}" if math.isfinite(v) else "-"


def markdown_table(report: dict[str, Any], level: str = "frame") -> str:
    """Rows: types; columns: levels 1-5 and their mean; cells: AUC in %; a clean line and a mean row."""
    from fdtrain.data.distortions import LEVELS, PROTOCOL

    types = [t for t in report if t != CLEAN]
    lines = [f"{level}-level AUC (%), clean {_pct(_auc(report[CLEAN], level))}", "",
             "| type | " + " | ".join(str(lv) for lv in LEVELS) + " | mean |",
             "|---|" + "---:|" * (len(LEVELS) + 1)]
    columns: dict[int, list[float]] = {lv: [] for lv in LEVELS}
    for t in types:
        vals = {int(lv): _auc(m, level) for lv, m in report[t].items()}
        for lv, v in vals.items():
            columns[lv].append(v)
        mean = _nanmean(list(vals.values()))
        cells = " | ".join(_pct(vals[lv]) if lv in vals else "-" for lv in LEVELS)
        lines.append(f"| {t} ({PROTOCOL[t][0]}) | {cells} | {_pct(mean)} |")
    if len(types) > 1:
        cells = " | ".join(_pct(_nanmean(columns[lv])) if columns[lv] else "-" for lv in LEVELS)
        lines.append(f"| mean | {cells} | {_pct(_nanmean([v for c in columns.values() for v in c]))} |")
    return "\n".join(lines)


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def auc_figure(report: dict[str, Any], title: str, level: str = "frame"):
    """AUC vs severity, one line per type, each starting at the clean AUC (severity 0)."""
    from matplotlib.figure import Figure

    from fdtrain.data.distortions import LEVELS, PROTOCOL

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    clean = _auc(report[CLEAN], level)
    for t in (k for k in report if k != CLEAN):
        lvls = sorted(int(lv) for lv in report[t])
        ax.plot([0, *lvls], [clean, *(_auc(report[t][str(lv)], level) for lv in lvls)], marker="o", lw=1.6,
                label=f"{t}: {PROTOCOL[t][0]}")
    ax.set(xlabel="severity level (0 = clean)", ylabel=f"{level}-level AUC", title=title,
           xticks=[0, *LEVELS], xlim=(-0.2, max(LEVELS) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def write_reports(report: dict[str, Any], out: str | os.PathLike, *, title: str, header: str = "") -> list[Path]:
    """robustness.json, robustness.md (frame and video AUC tables), robustness.png (frame AUC)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from fdtrain.engine.evaluate import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "robustness.json", report)
    md = (f"# Robustness: {title}\n\n{header}\n\n" if header else f"# Robustness: {title}\n\n")
    md += markdown_table(report, "frame") + "\n\n" + markdown_table(report, "video") + "\n"
    (out / "robustness.md").write_text(md)
    fig = auc_figure(report, title)
    FigureCanvasAgg(fig)
    fig.savefig(out / "robustness.png")
    return [out / "robustness.json", out / "robustness.md", out / "robustness.png"]


def log_tensorboard(tb, report: dict[str, Any], set_name: str, step: int, title: str) -> None:
    """robustness/<set>/<TYPE>/{frame,video}_auc against severity (0 = clean), the plot and the table."""
    if tb is None or tb.writer is None:
        return
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for t in (k for k in report if k != CLEAN):
        for level in ("frame", "video"):
            tag = f"robustness/{set_name}/{t}/{level}_auc"
            tb.writer.add_scalar(tag, _auc(report[CLEAN], level), 0)
            for lv in sorted(int(v) for v in report[t]):
                tb.writer.add_scalar(tag, _auc(report[t][str(lv)], level), lv)
    fig = auc_figure(report, title)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    tb.writer.add_image(f"robustness/{set_name}/auc_vs_severity", img, step, dataformats="HWC")
    tb.writer.add_text(f"robustness/{set_name}/table", markdown_table(report, "frame"), step)
    tb.flush()


def protocol_header(conds: list[tuple[str, int]]) -> str:
    from fdtrain.data.distortions import PROTOCOL, parameter

    lines = ["DeeperForensics-1.0 perturbation protocol (parameters of EndlessSora/DeeperForensics-1.0, "
             "perturbation/add_distortion_to_video.py; deviations in fdtrain/data/distortions.py):", ""]
    for t in dict.fromkeys(t for t, _ in conds):
        lv = [lv for tt, lv in conds if tt == t]
        lines.append(f"- {t}, {PROTOCOL[t][0]} ({PROTOCOL[t][2]}): "
                     + ", ".join(f"L{v} {parameter(t, v)}" for v in lv))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# After training (eval.robustness) and the command
# --------------------------------------------------------------------------------------------
def sweep_after_training(model, cfg, accelerator, tb, run_dir: str | os.PathLike, step: int, input_dtype=None) -> None:
    """The sweep on every test set of the recipe (eval.robustness), into run_dir/robustness/<set>/."""
    from fdtrain.data.distortions import parse_levels, parse_types

    r = cfg.eval.robustness
    conds = conditions(parse_types(r.types), parse_levels(r.levels))
    for set_name, folder in cfg.data.test.items():
        res = sweep(model, cfg, folder, conds, accelerator=accelerator, device=accelerator.device, name=set_name,
                    threshold=cfg.eval.threshold, seed=cfg.run.seed, input_dtype=input_dtype,
                    progress=cfg.logging.progress in ("auto", "bar") and sys.stderr.isatty())
        if accelerator.is_main_process:
            report = res.to_json()
            title = f"{cfg.run.name} on {set_name}"
            write_reports(report, Path(run_dir) / "robustness" / set_name, title=title, header=protocol_header(conds))
            log_tensorboard(tb, report, set_name, step, title)
            print(markdown_table(report), flush=True)


def add_robustness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="model.pt, a checkpoint folder (step-N/), or a run folder (its best, else newest, checkpoint; "
                        "then the plot and scalars also go to the run's TensorBoard)")
    p.add_argument("--data", required=True, help="one split folder of shards (with manifest.json)")
    p.add_argument("--types", default="all",
                   help="comma list of CS, CC, BW, GNC, GB, JPEG, VC (DeeperForensics-1.0 names), or all (default)")
    p.add_argument("--levels", default="1-5", help="severity levels: a range '1-5' (default) or a list '1,3,5'")
    p.add_argument("--out", default="",
                   help="output folder for robustness.{json,md,png} (default: <run>/robustness/<set> for a run "
                        "folder, else ./robustness/<set>)")
    p.add_argument("--name", default="", help="set name in titles and tags (default: the folder's name)")
    p.add_argument("--batch-size", type=int, default=0, help="per-process batch (default: the run's eval_batch_size)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the run's data.num_workers)")
    p.add_argument("--backend", choices=("auto", "dali", "torch"), default="",
                   help="loader of the clean pass (default: the run's); distorted passes use the torch workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=None, help="seed of the random distortions (default: the run's seed)")
    p.add_argument("--threshold", type=float, default=None, help="accuracy threshold (default: eval.threshold)")
    p.add_argument("--save-scores", action="store_true", help="also write scores.json: keys and scores per condition")


def _run_folder(checkpoint: str) -> Path | None:
    """The run folder a --checkpoint names or lies in (one with checkpoints/ and config.yaml)."""
    p = Path(checkpoint).resolve()
    for cand in (p, *p.parents)[:4]:
        if (cand / "checkpoints").is_dir() and (cand / "config.yaml").is_file():
            return cand
    return None


def run_robustness(args: argparse.Namespace) -> int:
    from fdtrain import report_error
    from fdtrain.data import DataError
    from fdtrain.data.distortions import parse_levels, parse_types

    try:
        conds = conditions(parse_types(args.types), parse_levels(args.levels))
    except ValueError as e:  # a bad --types/--levels
        report_error(f"fdtrain robustness: {e}")
        return 2
    try:
        return _run(args, conds)
    except (FileNotFoundError, DataError) as e:  # one message per job (rank 0)
        report_error(f"fdtrain robustness: {e}")
        return 2


def _run(args: argparse.Namespace, conds: list[tuple[str, int]]) -> int:
    import torch

    from fdtrain.data import DataError
    from fdtrain.engine.evaluate import write_json
    from fdtrain.inference import model_from_file
    from fdtrain.model_file import load_model_file

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        raise DataError(f"--data {data}: no manifest.json here (give one split folder written by "
                        "`fdtrain shards make`)")
    mf = load_model_file(args.checkpoint)
    model, cfg = model_from_file(mf)
    model_file, step = mf.path, mf.step or 0
    if args.batch_size:
        cfg.data.eval_batch_size = args.batch_size
    if args.backend:
        cfg.data.backend = args.backend
    threshold = cfg.eval.threshold if args.threshold is None else args.threshold
    seed = cfg.run.seed if args.seed is None else args.seed
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available())
        device = accelerator.device
    else:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
    main = accelerator is None or accelerator.is_main_process
    model.to(device)
    set_name = args.name or data.name
    res = sweep(model, cfg, data, conds, accelerator=accelerator, device=device, name=set_name, threshold=threshold,
                seed=seed, num_workers=args.num_workers, progress=main)
    if not main:
        return 0
    run_dir = _run_folder(args.checkpoint)
    out = Path(args.out) if args.out else (run_dir or Path(".")) / "robustness" / set_name
    report = res.to_json()
    title = f"{cfg.run.name} step {step} on {set_name}"
    header = f"checkpoint {model_file} (step {step}), data {data}, seed {seed}\n\n{protocol_header(conds)}"
    files = write_reports(report, out, title=title, header=header)
    from fdtrain.engine.evaluate import checkpoint_fingerprint  # what made these numbers (fdtrain.fingerprint)

    write_json(out / "fingerprint.json",
               checkpoint_fingerprint(model_file, mf.config, {set_name: data}))
    files.append(out / "fingerprint.json")
    if args.save_scores:
        scores = {CLEAN: {"keys": list(res.clean.keys), "scores": res.clean.scores.tolist()}}
        for (t, lv), r in res.distorted.items():
            scores[f"{t}/{lv}"] = {"keys": list(r.keys), "scores": r.scores.tolist()}
        write_json(out / "scores.json", scores)
        files.append(out / "scores.json")
    if run_dir is not None:
        from fdtrain.engine.tblog import TBLogger

        tb = TBLogger(run_dir / "tb", enabled=True)
        try:
            log_tensorboard(tb, report, set_name, int(step), title)
        finally:
            tb.close()
    n = res.n_samples
    print(f"checkpoint {model_file} (step {step}), {n} images x {len(conds) + 1} conditions")
    print(markdown_table(report, "frame"))
    print()
    print(markdown_table(report, "video"))
    total, seconds = n * (len(conds) + 1), res.seconds_clean + res.seconds_distorted
    print(f"\nclean pass: {n} images in {res.seconds_clean:.1f} s ({n / max(res.seconds_clean, 1e-9):.1f} images/s); "
          f"whole sweep: {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} images/s)")
    print("wrote " + ", ".join(str(f) for f in files) + (f"; TensorBoard {run_dir / 'tb'}" if run_dir else ""))
    sys.stdout.flush()
    return 0
