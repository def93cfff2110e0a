"""Arguments and entry points of `fdtrain train | evaluate | predict` (no heavy imports here)."""
from __future__ import annotations

import argparse
import sys

from fdtrain.config import EvalConfig
from fdtrain.data.prep.video import FRAMES_PER_VIDEO  # numpy only


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (may name a `base:` recipe)")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint of the run) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-schedule", action="store_true",
                   help="print the effective lr schedule (global batch, steps/epoch, warmup/hold/decay in steps "
                        "and epochs, peak lr) for --processes ranks and exit; nothing is built")
    p.add_argument("--processes", type=int, default=0,
                   help="with --print-schedule: number of ranks (default: $WORLD_SIZE, else 1)")
    p.add_argument("--train-samples", type=int, default=0,
                   help="with --print-schedule: training samples per epoch (default: from data.train's "
                        "manifest.json and data.balance)")
    p.epilog = "Any config field can be overridden: --section.key=value (e.g. --optim.lr=1e-4 --data.batch_size=16)."


def run_train(args: argparse.Namespace) -> int:
    from fdtrain.config import resolve

    cfg = resolve(args.recipe, list(args.overrides))
    if args.resume is not None:
        cfg.run.resume = args.resume
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    if args.print_schedule:
        return _print_schedule(cfg, args)
    from fdtrain.data import DataError
    from fdtrain.engine.trainer import train

    try:
        return train(cfg)
    except DataError as e:  # shards missing, empty, damaged: the message names the folder/shard/key
        from fdtrain import report_error

        report_error(f"fdtrain train: data error: {e}")
        return 2


def _print_schedule(cfg, args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from fdtrain.config import ConfigError
    from fdtrain.engine.optim import plan

    processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    samples, note = args.train_samples, "--train-samples"
    if not samples:
        manifest = Path(cfg.data.train) / "manifest.json"
        try:
            m = json.loads(manifest.read_text())
            samples, note = int(m["num_samples"]), str(manifest)
            if cfg.data.balance == "subsample_fakes":  # every real and as many fakes: what an epoch reads
                real, fake = int(m["counts"]["label"].get("0", 0)), int(m["counts"]["label"].get("1", 0))
                samples, note = real + min(real, fake), f"{manifest}, data.balance=subsample_fakes"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"--print-schedule: cannot read the training set size from data.train={cfg.data.train} "
                              f"({manifest}: {type(e).__name__}); pass --train-samples N (samples per epoch)") from None
    if processes < 1 or samples < 1:
        raise ConfigError("--print-schedule: --processes and --train-samples must be >= 1")
    schedule, spe = plan(cfg, samples, processes)
    print(f"{samples} training samples per epoch ({note})")
    print(schedule.describe(spe, batch=cfg.data.batch_size, processes=processes, grad_accum=cfg.train.grad_accum))
    return 0


# --------------------------------------------------------------------------------------------
# fdtrain evaluate
# --------------------------------------------------------------------------------------------
def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="model.pt, a checkpoint folder (step-N/), or a run folder (its best, else newest, checkpoint)")
    p.add_argument("--data", required=True,
                   help="a shard folder with manifest.json, or a dataset folder: each split folder in it is evaluated")
    p.add_argument("--name", default="",
                   help="set name in the output (one folder), or the split folders to pick (comma list)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=0, help="per-process batch (default: the run's eval_batch_size)")
    p.add_argument("--backend", choices=("auto", "dali", "torch"), default="", help="loader (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threshold", type=float, default=None, help="accuracy threshold (default: eval.threshold)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate at most this many batches per set (smoke runs)")


def run_evaluate(args: argparse.Namespace) -> int:
    from fdtrain.data import DataError
    from fdtrain.engine.evaluate import evaluate_checkpoint, format_table, write_json

    try:
        report = evaluate_checkpoint(args.checkpoint, args.data, name=args.name, batch_size=args.batch_size,
                                     backend=args.backend, device=args.device, max_batches=args.max_batches,
                                     threshold=args.threshold)
    except (FileNotFoundError, DataError) as e:
        print(f"fdtrain evaluate: {e}", file=sys.stderr)
        return 2
    if report.pop("is_main_process"):
        print(f"checkpoint {report['checkpoint']} (step {report['step']})")
        print(format_table(report["results"]))
        if args.out:
            write_json(args.out, report)
            print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# fdtrain predict
# --------------------------------------------------------------------------------------------
def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_VIDEO", help="image or video files, or folders of them")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model.pt, a checkpoint folder, or a run folder (PyTorch)")
    src.add_argument("--model", help="an .onnx file from `fdtrain export`, scored through ONNX Runtime "
                     "(torch is not needed: pip install '.[onnx]')")
    p.add_argument("--out", default="", help="write the JSON lines here instead of stdout")
    p.add_argument("--frames", type=int, default=FRAMES_PER_VIDEO,
                   help="frames sampled uniformly per video (default %(default)s, as `fdtrain shards make`)")
    p.add_argument("--detector", default="dlib", help="face detector for videos: dlib[:opts], boxes:FILE, none")
    p.add_argument("--crop-images", action="store_true", help="detect and crop faces in images too "
                   "(default: images are face crops already, as in the shards)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=EvalConfig.threshold,
                   help="score above which the label is 'fake' (default %(default)s, eval.threshold's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def run_predict(args: argparse.Namespace) -> int:
    import json

    from fdtrain.engine.predict import PredictOptions, predict_paths

    opts = PredictOptions(frames=args.frames, detector=args.detector, crop_images=args.crop_images,
                          batch_size=args.batch_size, threshold=args.threshold)
    out = open(args.out, "w") if args.out else sys.stdout
    failed = 0
    try:
        if args.model and not args.model.lower().endswith(".onnx"):
            raise FileNotFoundError(f"--model {args.model}: expected an .onnx file written by `fdtrain export` "
                                    "(a PyTorch checkpoint goes to --checkpoint)")
        for rec in predict_paths(args.model or args.checkpoint, args.inputs, opts, device=args.device):
            failed += rec.get("score") is None
            out.write(json.dumps(rec) + "\n")
            out.flush()
    except FileNotFoundError as e:
        print(f"fdtrain predict: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"fdtrain predict: {failed} input(s) could not be scored (see their 'error' field)", file=sys.stderr)
    return 1 if failed else 0
