"""CLI of `fdtrain shards make`, `fdtrain shards verify` and `fdtrain synth` (light imports only)."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from fdtrain.data.prep.sources import SOURCES
from fdtrain.data.prep.synth import SYNTH_DEFAULTS
from fdtrain.data.prep.video import FRAMES_PER_VIDEO

DEFAULT_FRAMES = {"synth": "all"}  # every other source: video.FRAMES_PER_VIDEO


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _frames(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames: a positive number or 'all', got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--frames: a positive number or 'all', got {text!r}")
    return n


def _size_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], None)
    try:
        return int(float(t[:-1]) * mult) if mult else int(float(t) * (1 << 20))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-size: e.g. 256MB, 1GB or 512 (MB), got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# shards make
# ---------------------------------------------------------------------------------------------
def add_shards_make_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--source", required=True, choices=SOURCES, help="dataset layout of --root")
    g.add_argument("--root", required=True, help="dataset root folder")
    g.add_argument("--splits", type=_csv, default=("train", "val", "test"),
                   help="output splits to write (comma list; default train,val,test)")
    g.add_argument("--methods", default="", help="ffpp/synth: manipulation methods for train/val/test, comma list "
                   "or 'all' ('' = Deepfakes,Face2Face,FaceSwap,NeuralTextures where present)")
    g.add_argument("--holdout-tests", action="store_true",
                   help="ffpp/synth: also write test_<Method> (that method's test fakes + the test reals) per method")
    g.add_argument("--compression", default="c23", help="ffpp: c23 (default), c40 or raw")
    g.add_argument("--splits-dir", default="",
                   help="ffpp: folder of train/val/test.json ('' = <root>/splits or <root>)")
    g.add_argument("--val-percent", type=float, default=10.0,
                   help="celebdf/wdf: percent of training identities (celebdf) or archives (wdf) carved out as val "
                   "(default 10)")
    g.add_argument("--csv", default="", help="folders: CSV with columns path,label,video,split[,method]")
    g.add_argument("--rule", default="",
                   help="folders: regex with groups split, label, video[, method] on relative paths")
    g.add_argument("--name", default="", help="dataset name that starts every key ('' = the source's name)")
    g = p.add_argument_group("crops")
    g.add_argument("--frames", type=_frames, default=None,
                   help=f"frames per video, spread over the whole video, or 'all' (default {FRAMES_PER_VIDEO}; "
                   "synth: all)")
    g.add_argument("--detector", default="dlib",
                   help="dlib (default; options: dlib:upsample=0,max_side=640,retry_upsample=1), "
                   "boxes:FILE.json, none (frames are crops), or package.module:Class")
    g.add_argument("--detect-frames", action="store_true", help="folders: detect faces in image frames too")
    g.add_argument("--margin", type=float, default=1.3, help="square crop side / detected box side (default 1.3)")
    g.add_argument("--size", type=int, default=None,
                   help="short side of stored crops in px (default 320 for detected faces, native for crops; 0 native)")
    g.add_argument("--format", choices=("jpg", "png"), default="jpg",
                   help="jpg decodes on the GPU in DALI; png is lossless, ~3-5x larger and CPU-decoded")
    g.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    g = p.add_argument_group("shards")
    g.add_argument("--out", required=True, help="output folder: one shard folder per split inside")
    g.add_argument("--shard-size", type=_size_bytes, default=256 << 20,
                   help="target shard size, e.g. 256MB (default), 1GB")
    g.add_argument("--min-shards", type=int, default=8,
                   help="at least this many shards per split, for ranks x loader workers (default 8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default 0)")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: the CPU count)")
    g.add_argument("--work", default="", help="folder of per-video records ('' = <out>/.work); resumes from it")
    g.add_argument("--keep-work", action="store_true", help="keep the per-video records after assembling")
    g.add_argument("--stage", choices=("all", "process", "assemble"), default="all",
                   help="all (default); process: crops only (SLURM array tasks); assemble: shards from records")
    g.add_argument("--task-index", type=int, default=0,
                   help="process only jobs i where i %% num-tasks == task-index (default 0)")
    g.add_argument("--num-tasks", type=int, default=1, help="number of tasks sharing the jobs (default 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def canonical_command(args: argparse.Namespace, names: list[str]) -> str:
    """The command line that made the shards, with every option spelled out."""
    parts = ["fdtrain", "shards", "make"]
    for n in names:
        v = getattr(args, n)
        flag = "--" + n.replace("_", "-")
        if isinstance(v, bool):
            parts += [flag] if v else []
        elif isinstance(v, tuple):
            parts += [flag, ",".join(v)]
        elif v is None or v == "":
            continue
        else:
            parts += [flag, str(v)]
    return shlex.join(parts)


_SHAPE_ARGS = ["source", "root", "splits", "methods", "holdout_tests", "compression", "splits_dir", "val_percent",
               "csv", "rule", "name", "frames", "detector", "detect_frames", "margin", "size", "format", "quality",
               "out", "shard_size", "min_shards", "seed"]


def default_frames(source: str) -> int | None:
    """Frames per video when --frames is not given: FRAMES_PER_VIDEO (what `fdtrain predict` samples
    too); None (all) for the sources in DEFAULT_FRAMES."""
    return None if source in DEFAULT_FRAMES else FRAMES_PER_VIDEO


def run_shards_make(args: argparse.Namespace) -> int:
    from fdtrain.data.prep import ingest
    from fdtrain.data.prep.sources import SourceOptions, load_source

    if args.frames is None:
        args.frames = default_frames(args.source)
    if args.num_tasks < 1 or not 0 <= args.task_index < args.num_tasks:
        print(f"shards make: --task-index {args.task_index} not in [0, --num-tasks {args.num_tasks})", file=sys.stderr)
        return 2
    root, out = Path(args.root).resolve(), Path(args.out).resolve()
    methods = None
    if args.methods == "all":
        from fdtrain.data.prep.sources.ffpp import PAIR_METHODS

        manip = root / "manipulated_sequences"
        methods = tuple(m for m in PAIR_METHODS if manip.is_dir() and (manip / m).is_dir())
    elif args.methods:
        methods = _csv(args.methods)
    opts = SourceOptions(splits=args.splits, methods=methods, holdout_tests=args.holdout_tests,
                         compression=args.compression, splits_dir=args.splits_dir, val_percent=args.val_percent,
                         csv=args.csv, rule=args.rule, name=args.name, detect_frames=args.detect_frames)
    try:
        plan = load_source(args.source).enumerate_jobs(root, opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"shards make: {e}", file=sys.stderr)
        return 2
    crop = ingest.CropOptions(frames=args.frames, margin=args.margin, size=args.size, fmt=args.format,
                              quality=args.quality, detector=args.detector)
    if args.stage != "assemble" and "boxes" != args.detector.split(":")[0]:
        try:  # fail before starting workers, naming the bad option
            from fdtrain.data.prep.faces import make_detector

            make_detector(args.detector)
        except (ValueError, ImportError) as e:
            print(f"shards make: {e}", file=sys.stderr)
            return 2
    work = Path(args.work).resolve() if args.work else out / ".work"
    jobs = plan.needed_jobs()
    for note in plan.notes:
        print(f"shards make: {note}")
    if args.stage != "assemble":
        mine = jobs[args.task_index::args.num_tasks]
        t0 = time.time()
        stats = ingest.run_jobs(mine, crop, work, workers=args.workers, progress=not args.no_progress)
        dt = time.time() - t0
        print(f"shards make: {len(mine)} jobs ({stats['done']} already done, {stats['pending']} processed: "
              f"{stats['samples']} crops, {stats['skipped']} skipped inputs) in {dt:.1f}s")
        if args.stage == "process":
            return 0
    extra = {"dataset_source": args.source, "command": canonical_command(args, _SHAPE_ARGS)}
    try:
        manifests = ingest.assemble(plan, crop, out, work, seed=args.seed, shard_bytes=args.shard_size,
                                    min_shards=args.min_shards, extra=extra)
    except RuntimeError as e:
        print(f"shards make: {e}", file=sys.stderr)
        return 1
    print(ingest.summarize(manifests))
    print(f"shards make: wrote {', '.join(sorted(manifests))} under {out}")
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------
# shards verify
# ---------------------------------------------------------------------------------------------
def add_shards_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a split folder (with manifest.json) or a dataset folder of split folders")
    p.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (checksums still catch damage)")
    p.add_argument("--max-report", type=int, default=50, help="problems printed per split")


def run_shards_verify(args: argparse.Namespace) -> int:
    from fdtrain.data.prep.verify import verify

    return verify(args.dir, workers=args.workers, decode=not args.no_decode, max_report=args.max_report)


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    DEFAULTS = SYNTH_DEFAULTS
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--out", required=True, help="folder of the FF++-shaped tree")
    p.add_argument("--videos", type=int, default=DEFAULTS["videos"], help="identities = real videos (even)")
    p.add_argument("--frames", type=int, default=DEFAULTS["frames"], help="frames per video")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="side of the square face crops in px")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="everything follows from it")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering videos")


def run_synth(args: argparse.Namespace) -> int:
    from fdtrain.data.prep.synth import write_benchmark

    t0 = time.time()
    info = write_benchmark(args.out, videos=args.videos, frames=args.frames, size=args.size, seed=args.seed,
                           workers=args.workers)
    n = info["counts"]
    print(f"synth: {n['real']} real + {n['fake']} fake videos x {args.frames} frames "
          f"({', '.join(f'{k} {v}' for k, v in info['split_sizes'].items())} identities) in {args.out} "
          f"in {time.time() - t0:.1f}s")
    return 0
