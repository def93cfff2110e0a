"""``fdtrain bench shards``: face crops per second of ingestion for 1..N worker processes.

Times the process stage of `fdtrain shards make` (decode every frame up to the last one chosen,
detect, crop, resize, JPEG-encode, write the record) on the same videos once per worker count;
1 worker is the baseline and the other rows give their speed-up over it. The videos are either a
dataset (``--source ffpp --root DIR``, the first ``--videos`` jobs) or, by default, clips made on
the spot from scikit-image's astronaut photograph (a real face) panned across a 640x480 frame,
H.264 like FF++. Prints a table and one JSON line (``--json PATH`` writes it too).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fdtrain.bench import emit_result


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="measure 1..N worker processes")
    p.add_argument("--videos", type=int, default=8, help="videos per measurement")
    p.add_argument("--video-frames", type=int, default=48, help="length of the generated clips")
    p.add_argument("--frames", type=int, default=16, help="frames taken per video (spread uniformly)")
    p.add_argument("--detector", default="dlib", help="detector spec, as for shards make")
    p.add_argument("--size", type=int, default=320, help="short side of the stored crops")
    p.add_argument("--source", default="", help="bench on a dataset instead: ffpp, celebdf, ... (with --root)")
    p.add_argument("--root", default="", help="dataset root for --source")
    p.add_argument("--json", metavar="PATH", default="", help="also write the JSON result to PATH")


def _make_clips(folder: Path, n: int, frames: int) -> list:
    """``n`` 640x480 H.264 clips of the astronaut's face moving over a textured background."""
    import numpy as np

    from fdtrain.data.prep.sources import VideoJob
    from fdtrain.data.prep.video import write_test_video

    try:
        from skimage import data
    except ImportError:
        raise SystemExit("fdtrain bench shards: needs scikit-image for its test photograph "
                         "(pip install scikit-image), or bench a dataset with --source/--root") from None
    face = data.astronaut()[20:300, 90:350]  # head and shoulders, 280x260
    jobs = []
    rng = np.random.default_rng(0)
    for v in range(n):
        bg = rng.integers(0, 255, (60, 80, 3)).astype(np.uint8)
        bg = np.kron(bg, np.ones((8, 8, 1), np.uint8))
        clip = []
        for t in range(frames):
            f = bg.copy()
            x, y = 100 + 4 * t % 200 + 10 * v, 60 + (2 * t + 7 * v) % 100
            f[y:y + face.shape[0], x:x + face.shape[1]] = face
            clip.append(f)
        path = folder / f"{v:03d}.mp4"
        write_test_video(path, clip, fps=25, codec="libx264")
        jobs.append(VideoJob(key=f"bench/clip/{v:03d}", dataset="bench", split="test", label=0, method="original",
                             compression="", source=path.name, path=str(path)))
    return jobs


def _dataset_jobs(source: str, root: str, n: int) -> list:
    from fdtrain.data.prep.sources import SourceOptions, load_source

    plan = load_source(source).enumerate_jobs(Path(root), SourceOptions())
    jobs = plan.needed_jobs()[:n]
    if not jobs:
        raise SystemExit(f"fdtrain bench shards: no videos found by --source {source} under {root}")
    return jobs


def run_bench(args: argparse.Namespace) -> int:
    from fdtrain.data.prep.ingest import CropOptions, run_jobs

    if min(args.workers, args.videos, args.frames, args.video_frames) < 1:
        print("fdtrain bench shards: --workers, --videos, --frames and --video-frames must be >= 1", file=sys.stderr)
        return 2
    if bool(args.source) != bool(args.root):
        print("fdtrain bench shards: --source and --root go together", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="fdtrain-bench-shards-"))
    try:
        t0 = time.perf_counter()
        jobs = _dataset_jobs(args.source, args.root, args.videos) if args.source else \
            _make_clips(tmp, args.videos, args.video_frames)
        prep = time.perf_counter() - t0
        opts = CropOptions(frames=args.frames, size=args.size, detector=args.detector)
        rows = []
        for w in range(1, args.workers + 1):
            work = tmp / f"work{w}"
            t0 = time.perf_counter()
            stats = run_jobs(jobs, opts, work, workers=w, progress=sys.stderr.isatty())
            dt = time.perf_counter() - t0
            rows.append({"workers": w, "crops": stats["samples"], "skipped": stats["skipped"], "seconds": dt,
                         "crops_per_s": stats["samples"] / dt if dt > 0 else 0.0})
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["crops_per_s"] or 1.0
    for r in rows:
        r["speedup_vs_1_worker"] = r["crops_per_s"] / base
    result = {"bench": "shards", "input": f"{args.source}:{args.root}" if args.source else "astronaut clips 640x480",
              "videos": len(jobs), "frames_per_video": args.frames, "detector": args.detector, "crop_size": args.size,
              "cpus": os.cpu_count(), "prepare_s": prep, "results": rows}
    print(f"fdtrain bench shards: {len(jobs)} videos x {args.frames} frames, detector {args.detector}, "
          f"crops {args.size}px, {os.cpu_count()} CPUs (worker start-up included)")
    print(f"{'workers':>7} {'crops':>6} {'skipped':>7} {'seconds':>8} {'crops/s':>8} {'vs 1 worker':>11}")
    for r in rows:
        print(f"{r['workers']:>7} {r['crops']:>6} {r['skipped']:>7} {r['seconds']:>8.2f} {r['crops_per_s']:>8.1f} "
              f"{r['speedup_vs_1_worker']:>10.2f}x")
    emit_result(result, args.json)
    return 0
