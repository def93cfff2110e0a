"""``fdtrain bench data``: loader images/s of DALI, the PyTorch fallback and a naive baseline.

All pipelines read the same JPEG face crops in one run: the DALI CPU pipeline, the fallback with
1..N workers, the DALI ``mixed`` (GPU) pipeline and the fallback on the GPU with ``--device cuda``,
and the naive baseline of common detector codebases: one JPEG file per sample, PIL decode,
torchvision ``Resize`` / ``RandomHorizontalFlip`` / ``ToTensor`` / ``Normalize`` in a DataLoader with
the same number of workers. Every pipeline shuffles and flips; "X" rows produce the clean view only
(the baseline's work), "X+X~" rows also the noisy view of training batches: on a CPU its Gaussian
draws (~3 ns per value, ~0.4 ms per 299-px image at noise_p 0.5) cost about as much as decoding.

Rounds are interleaved (every pipeline once per round, median over rounds), so a machine shared
with other work slows all of them alike and the ratios stay meaningful. Each pass starts timing at
its first batch: pipeline builds and worker start-up are not counted. Beside images/s the table
gives CPU milliseconds per image (this process's threads plus its finished workers, start-up
included), which other work on the machine distorts far less than wall-clock rates. Without ``--shards`` the
bench writes its own data (``--samples`` crops at ``--image-size`` px, as shards and as loose
files, the same bytes). Prints a table and one JSON line; ``--json PATH`` writes the JSON too.

No torch or DALI import at module level: ``fdtrain --help`` stays instant.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fdtrain.bench import emit_result
from fdtrain.config import DataConfig, ModelConfig


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default="", help="a shard folder (with manifest.json) to read; '' = make one")
    p.add_argument("--samples", type=int, default=1024, help="crops to make when --shards is not given")
    p.add_argument("--image-size", type=int, default=320, help="side of the crops to make, in px")
    p.add_argument("--size", type=int, default=ModelConfig.input_size, help="model input side (resize target)")
    p.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    p.add_argument("--workers", default="", help="fallback worker counts, e.g. 1,2,4 ('' = 1..min(4, cores))")
    p.add_argument("--threads", type=int, default=0, help="DALI threads and naive-baseline workers (0 = cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N to add the DALI mixed pipeline")
    p.add_argument("--noise-p", type=float, default=DataConfig.noise_p,
                   help="X~ rows: share of samples with noise (data.noise_p)")
    p.add_argument("--noise-std", type=float, default=DataConfig.noise_std,
                   help="X~ rows: std of the noise (data.noise_std)")
    p.add_argument("--only", default="", help="comma-separated subset of rows: naive,dali,torch,dali-mixed")
    p.add_argument("--json", metavar="PATH", default="", help="also write the JSON result to PATH")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def make_bench_data(out: Path, n: int, image_size: int, seed: int = 0) -> Path:
    """n JPEG crops (smooth colour fields + grain, q90: ~25 KB at 320 px, like face crops) as a shard
    folder ``out/shards`` written by fdtrain's shard writer."""
    import io

    import numpy as np
    from PIL import Image

    from fdtrain.data.format import Sample, plan_shards, write_split

    rng = np.random.default_rng(seed)

    def samples():
        for k in range(n):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((image_size,) * 2, Image.BICUBIC), dtype=np.float32)
            img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            key = f"bench/c23/Synthetic/{k // 32:03d}_{k // 32 + 500:03d}/{k % 32:04d}"
            yield Sample(key=key, image=buf.getvalue(), ext="jpg", label=k % 2,
                         meta={"dataset": "bench", "split": "train", "method": "Synthetic", "video": key[:-5],
                               "frame": k % 32, "compression": "c23", "source": "fdtrain bench data"})

    folder = out / "shards"
    write_split(samples(), folder, plan_shards(n, n * 25_000, 1 << 20, 8), {"command": "fdtrain bench data"})
    return folder


def loose_files(shards: Path, out: Path) -> list[tuple[str, int]]:
    """The shards' images as one file per sample (what the naive baseline reads): (path, label)."""
    from fdtrain.data.format import IMAGE_EXTS, iter_tar_samples, parse_label, read_manifest

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for entry in read_manifest(shards)["shards"]:
        for key, parts in iter_tar_samples(shards / entry["name"]):
            ext = next(e for e in IMAGE_EXTS if e in parts)
            path = out / f"{len(files):07d}.{ext}"
            path.write_bytes(parts[ext])
            files.append((str(path), int(parse_label(parts["cls"], key, entry["name"]))))
    return files


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------
class NaiveFiles:
    """Per-file PIL decode and torchvision transforms, the usual detector-codebase loader."""

    def __init__(self, files: list[tuple[str, int]], size: int):
        import torchvision.transforms as T

        self.files = files
        self.tf = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as img:
            return self.tf(img.convert("RGB")), label


def _naive_pass(files, args, workers: int, device):
    from torch.utils.data import DataLoader

    dl = DataLoader(NaiveFiles(files, args.size), batch_size=args.batch_size, shuffle=True, drop_last=True,
                    num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    for x, y in dl:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x.shape[0], x


def _loader_pass(cfg, device, epoch: int):
    from fdtrain.data import build_loader

    loader = build_loader(cfg, "train", device=device)
    loader.set_epoch(epoch)
    for b in loader:
        yield b["x"].shape[0], b["x_noisy"]


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(batches, device) -> tuple[float, float]:
    """(images/s from the first batch to the last, CPU ms per image over the whole pass).

    The wall-clock rate leaves start-up out; the CPU figure includes it (workers are only counted
    once they exit) and is what a machine shared with other work distorts least.
    """
    import torch

    cpu0 = _cpu_seconds()
    n, total, t0, last = 0, 0, None, None
    for count, tensor in batches:
        last = tensor
        total += count
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += count
    if device.type == "cuda" and last is not None:
        torch.cuda.synchronize(device)
    rate = n / (time.perf_counter() - t0) if t0 is not None and n else float("nan")
    del batches, last  # let the workers exit before reading their CPU time
    return rate, (_cpu_seconds() - cpu0) / max(1, total) * 1e3


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    import torch

    from fdtrain.config import from_dict
    from fdtrain.data.loading import dali_available

    cores = os.cpu_count() or 1
    threads = args.threads or cores
    workers = [int(w) for w in args.workers.split(",") if w.strip()] or list(range(1, min(4, cores) + 1))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"fdtrain bench data: --device {args.device} but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    want = lambda name: not only or name in only  # noqa: E731
    has_dali = dali_available()
    if only & {"dali", "dali-mixed"} and not has_dali:
        print("fdtrain bench data: DALI rows asked for but nvidia.dali is not installed", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="fdtrain-bench-data-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        shards = Path(args.shards) if args.shards else make_bench_data(tmp, args.samples, args.image_size)
        files = loose_files(shards, tmp / "files")
        print(f"fdtrain bench data: {len(files)} samples ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if len(files) < 3 * args.batch_size:
            print(f"fdtrain bench data: {len(files)} samples: need at least 3 batches", file=sys.stderr)
            return 2

        def cfg(backend: str, nw: int, noise_p: float):
            return from_dict({"model": {"input_size": args.size}, "data": {
                "train": str(shards), "backend": backend, "batch_size": args.batch_size, "num_workers": nw,
                "num_threads": threads, "prefetch": 2, "shuffle_buffer": min(512, len(files)),
                "noise_p": noise_p, "noise_std": args.noise_std}})

        # (row name, description, workers/threads, factory of one pass). "X" rows do the baseline's work
        # (decode, resize, flip, normalize); "X+X~" rows add the noisy view (noise_p = --noise-p).
        cpu, top = torch.device("cpu"), max(workers)
        rows = []
        if want("naive"):
            rows.append(("naive", "X: PIL + torchvision transforms, one file per sample", f"{threads} workers",
                         lambda e: _naive_pass(files, args, threads, device)))
        if want("dali") and has_dali:
            rows.append(("dali-cpu", "X: DALI, cpu decoder", f"{threads} threads",
                         lambda e: _loader_pass(cfg("dali", 0, 0.0), cpu, e)))
            rows.append(("dali-cpu+n", "X+X~: DALI, cpu decoder", f"{threads} threads",
                         lambda e: _loader_pass(cfg("dali", 0, args.noise_p), cpu, e)))
        if device.type == "cuda" and has_dali and want("dali-mixed"):
            rows.append(("dali-mixed+n", "X+X~: DALI, mixed (GPU) decoder", f"{threads} threads",
                         lambda e: _loader_pass(cfg("dali", 0, args.noise_p), device, e)))
        if want("torch"):
            for nw in workers:
                rows.append((f"torch-w{nw}", f"X: fallback, output on {device.type}", f"{nw} workers",
                             lambda e, nw=nw: _loader_pass(cfg("torch", nw, 0.0), device, e)))
            rows.append((f"torch-w{top}+n", f"X+X~: fallback, output on {device.type}", f"{top} workers",
                         lambda e: _loader_pass(cfg("torch", top, args.noise_p), device, e)))
        if not rows:
            print(f"fdtrain bench data: nothing to run (--only {args.only!r})", file=sys.stderr)
            return 2

        rates: dict[str, list[float]] = {r[0]: [] for r in rows}
        cpu_ms: dict[str, list[float]] = {r[0]: [] for r in rows}
        from tqdm import tqdm

        with tqdm(total=args.rounds * len(rows), desc="bench data", unit="pass", file=sys.stderr, leave=False) as bar:
            for rnd in range(args.rounds):
                for name, _, _, make in rows:  # round robin: background load hits every pipeline alike
                    rate, ms = _timed(make(rnd), device)
                    rates[name].append(rate)
                    cpu_ms[name].append(ms)
                    bar.update(1)

    med = {n: statistics.median(v) for n, v in rates.items()}
    cpu = {n: statistics.median(v) for n, v in cpu_ms.items()}
    base = med.get("naive")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cores} cores)"
    result = {
        "bench": "data", "device": device_name, "samples": len(files), "image_size": args.image_size,
        "size": args.size, "batch_size": args.batch_size, "rounds": args.rounds, "noise_p": args.noise_p,
        "noise_std": args.noise_std,
        "results": {n: {"images_per_s": med[n], "all": [round(v, 1) for v in rates[n]], "what": what,
                        "parallelism": par, "vs_naive": (med[n] / base) if base else None,
                        "cpu_ms_per_image": cpu[n], "cpu_vs_naive": (cpu["naive"] / cpu[n]) if base else None}
                    for n, what, par, _ in rows},
    }
    src = args.shards or f"{len(files)} synthetic JPEG crops at {args.image_size} px"
    print(f"fdtrain bench data: {src} -> {args.size}x{args.size}, batch {args.batch_size}, {device_name}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'pipeline':<14} {'parallelism':<12} {'images/s':>9} {'vs naive':>9} {'CPU ms/img':>11} "
          f"{'vs naive':>9}  output")
    for name, what, par, _ in rows:
        ratio = f"{med[name] / base:.2f}x" if base else "-"
        cpu_ratio = f"{cpu['naive'] / cpu[name]:.2f}x" if base else "-"
        print(f"{name:<14} {par:<12} {med[name]:>9.0f} {ratio:>9} {cpu[name]:>11.2f} {cpu_ratio:>9}  {what}")
    emit_result(result, args.json)
    return 0
