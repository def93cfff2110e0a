"""``fdtrain bench train``: end-to-end training images/s and the share of step time spent waiting
for data, for the current loader backend and device.

Builds the real Trainer (Accelerate, the model, the optimizer, the loader of ``--data`` or of a
synthetic benchmark written to a temporary folder) and times its ``train_step`` in two ways, in
the same process:

* compute only (the baseline): the same step repeated on one batch already on the device;
* end to end: batches from the loader, as training gets them, with the time spent in ``next()``
  recorded as data wait.

The ratio end-to-end / compute-only says how much the input pipeline costs; the data-wait share
says how much of each step the model sat idle waiting. Prints a table and one JSON line
(``--json PATH`` writes it too). No torch import at module level.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fdtrain.bench import emit_result


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="shard folder of a train split, or a dataset folder with train/ "
                   "(default: a small synthetic benchmark written to a temporary folder)")
    p.add_argument("--recipe", default="", help="recipe to start from (default: the built-in defaults)")
    p.add_argument("--backend", choices=("auto", "dali", "torch"), default="auto", help="loader backend")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="per-process batch (default: 4 on a CPU, 32 on a GPU)")
    p.add_argument("--size", type=int, default=0, help="input side in px (default: 64 on a CPU, 299 on a GPU)")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="",
                   help="mixed precision (default: no on a CPU, bf16 on a GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="DALI threads / DataLoader workers (default: the recipe's)")
    p.add_argument("--compile", action="store_true", help="train.compile=true (compile time goes into the warmup)")
    p.add_argument("--json", metavar="PATH", default="", help="also write the JSON result to PATH")


def _synthetic(root: Path, size: int, min_samples: int) -> Path:
    """A synthetic FF++-shaped benchmark as shards (fdtrain synth + fdtrain shards make)."""
    videos = max(8, 2 * -(-min_samples // (2 * 5 * 8)))  # 5 videos (1 real + 4 fake) per identity, 8 frames
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (["synth", "--out", str(root / "synth"), "--videos", str(videos), "--frames", "8",
                 "--size", str(max(64, size)), "--workers", str(min(4, os.cpu_count() or 1))],
                ["shards", "make", "--source", "synth", "--root", str(root / "synth"), "--out", str(root / "shards"),
                 "--min-shards", "8", "--no-progress", "--workers", str(min(4, os.cpu_count() or 1))]):
        subprocess.run([sys.executable, "-m", "fdtrain", *cmd], check=True, env=env, stdout=subprocess.DEVNULL)
    return root / "shards" / "train"


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from fdtrain.config import resolve

    if args.steps < 1 or args.warmup < 0:
        print("fdtrain bench train: --steps >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and args.device != "cpu"
    size = args.size or (299 if cuda else 64)
    batch = args.batch_size or (32 if cuda else 4)
    precision = args.precision or ("bf16" if cuda else "no")
    with tempfile.TemporaryDirectory(prefix="fdtrain-bench-train-") as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else _synthetic(tmp, size, batch * (args.steps + args.warmup + 1))
        if (data / "train" / "manifest.json").is_file():
            data = data / "train"
        over = [f"--data.train={data}", "--data.val=", f"--data.backend={args.backend}",
                f"--model.input_size={size}", f"--data.batch_size={batch}", f"--train.mixed_precision={precision}",
                f"--run.device={args.device}", f"--run.out_dir={tmp / 'runs'}", "--run.name=bench",
                "--logging.tensorboard=false", "--logging.progress=off", "--model.pretrained=false"]
        if args.compile:
            over.append("--train.compile=true")
        if args.threads:
            over += [f"--data.num_threads={args.threads}", f"--data.num_workers={args.threads}"]
        cfg = resolve(args.recipe or None, over)
        cfg.data.test = {}
        return _measure(cfg, args)


def _measure(cfg, args: argparse.Namespace) -> int:
    import torch

    from fdtrain.engine.trainer import Trainer

    trainer = Trainer(cfg)
    acc = trainer.acc
    device = acc.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    trainer.loader.set_epoch(0)
    trainer.model.train()
    try:
        from tqdm import tqdm

        bar = tqdm(total=3 * args.warmup + 2 * args.steps + (args.steps == 1), desc="bench train", unit="step",
                   file=sys.stderr, leave=False, disable=not acc.is_main_process)
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        bar = None

    def batches():
        """Loader batches for as many epochs as the steps need."""
        epoch = 0
        while True:
            trainer.loader.set_epoch(epoch)
            yield from trainer.loader
            epoch += 1

    it = batches()
    first = next(it)

    def timed(steps: int, feed) -> tuple[float, float]:
        """(seconds, seconds in next()) over ``steps`` steps after ``args.warmup`` untimed ones."""
        total = waited = 0.0
        for i in range(args.warmup + steps):
            sync()
            t0 = time.perf_counter()
            batch = feed()
            t1 = time.perf_counter()
            trainer.train_step(batch)
            sync()
            if i >= args.warmup:
                total, waited = total + time.perf_counter() - t0, waited + t1 - t0
            if bar is not None:
                bar.update(1)
        return total, waited

    # Compute only (the first batch again, already on the device) brackets end to end, half before
    # and half after, so a machine whose load drifts skews the ratio less. The end-to-end warmup
    # steps eat the batches the loader prefetched meanwhile, so they cannot hide data wait.
    half = max(1, args.steps // 2)
    c1, _ = timed(half, lambda: first)
    e2e_time, wait = timed(args.steps, lambda: next(it))
    c2, _ = timed(args.steps - half or 1, lambda: first)
    compute_time = (c1 + c2) * args.steps / (half + (args.steps - half or 1))
    it.close()
    if bar is not None:
        bar.close()
    trainer.close()

    world, b = acc.num_processes, cfg.data.batch_size
    imgs = args.steps * b * world
    results = {
        "compute_only": {"images_per_s": imgs / compute_time, "step_ms": 1e3 * compute_time / args.steps},
        "end_to_end": {"images_per_s": imgs / e2e_time, "step_ms": 1e3 * e2e_time / args.steps,
                       "data_wait_share": wait / e2e_time},
    }
    ratio = results["end_to_end"]["images_per_s"] / results["compute_only"]["images_per_s"]
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} torch threads)")
    result = {"bench": "train", "device": device_name, "backend": trainer.loader.backend,
              "precision": acc.mixed_precision, "batch_size": b, "world_size": world, "size": cfg.model.input_size,
              "forward": cfg.model.forward, "steps": args.steps, "warmup": args.warmup,
              "images_per_s": results["end_to_end"]["images_per_s"],
              "data_wait_share": results["end_to_end"]["data_wait_share"],
              "end_to_end_vs_compute_only": ratio, "results": results, "torch": torch.__version__,
              "compiled": bool(cfg.train.compile), "channels_last": cfg.model.channels_last}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if acc.is_main_process:
        print(f"fdtrain bench train: FakeDiffer {cfg.model.forward}, {cfg.model.input_size}x{cfg.model.input_size}, "
              f"batch {b} x {world} rank(s), precision {acc.mixed_precision}, {device_name}, "
              f"loader {trainer.loader.backend}, {args.steps} timed steps")
        print(f"{'run':<28} {'images/s':>10} {'step ms':>9} {'data wait':>10} {'vs compute-only':>16}")
        c, e = results["compute_only"], results["end_to_end"]
        print(f"{'compute only (one batch)':<28} {c['images_per_s']:>10.2f} {c['step_ms']:>9.1f} {'-':>10} "
              f"{'1.00x':>16}")
        print(f"{'end to end (' + trainer.loader.backend + ')':<28} {e['images_per_s']:>10.2f} {e['step_ms']:>9.1f} "
              f"{100 * e['data_wait_share']:>9.1f}% {ratio:>15.2f}x")
        emit_result(result, args.json)
    acc.end_training()
    return 0
