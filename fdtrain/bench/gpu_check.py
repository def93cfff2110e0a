"""The Python stages of ``launch/gpu_check.sh``: ``python -m fdtrain.bench.gpu_check STAGE``.

* ``preflight``: Python, torch, CUDA, cuDNN, NCCL, the GPU, and which optional packages import.
* ``sync-audit``: a few warm training steps (the real Trainer) under
  ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising call is counted, by where it came
  from (inside ``Trainer.train_step`` or in the loader's ``next()``). ``train_step`` must have none,
  with the defaults (fused forward, paired reduction) and with the paper step (``--forward two_pass
  --recon-reduction released``), whose class split takes the loader's host-made class rows.
* ``decode``: GPU JPEG decode rate: DALI's ``mixed`` decoder when DALI imports, else
  ``torchvision.io.decode_jpeg`` on CUDA as a stand-in (the reason is printed).

Each prints what it found and ends with one JSON line (the shell script files it). Exit 0: ran;
77: skipped, with the reason on the line before (e.g. no CUDA device); anything else: failed.
No torch import at module level.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SKIP = 77
OPTIONAL = ("nvidia.dali", "webdataset", "braceexpand", "scipy", "sklearn", "timm", "accelerate", "tensorboard",
            "torchvision", "deepspeed", "av", "dlib", "PIL", "yaml", "tqdm", "pytest")
_DIST = {"nvidia.dali": None, "sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "av": "av", "dlib": None}


def _emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def _skip(reason: str) -> int:
    print(f"SKIP: {reason}", flush=True)
    _emit({"skipped": reason})
    return SKIP


def _version(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return None
    dist = _DIST.get(module, module)
    candidates = [dist] if dist else []
    if module == "nvidia.dali":
        candidates = ["nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"]
    if module == "dlib":
        candidates = ["dlib-bin", "dlib"]
    for name in candidates:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "present"


def preflight(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": cuda, "cpu_count": __import__("os").cpu_count(),
            "packages": {m: _version(m) for m in OPTIONAL}}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    gpu_memory_gb=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001 - report, do not fail the preflight on it
            info["nccl"] = f"unavailable ({e})"
    try:
        import subprocess

        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable ({e.__class__.__name__})"
    for k, v in info.items():
        if k != "packages":
            print(f"{k:>16}: {v}")
    print(f"{'packages':>16}: " + ", ".join(f"{m}={v or 'MISSING'}" for m, v in info["packages"].items()))
    _emit(info)
    if not cuda and not args.cpu_dry_run:
        print("no CUDA device visible to torch (CPU-only torch, or CUDA_VISIBLE_DEVICES hides the GPU)")
        return 1
    return 0


def _tiny_trainer(root: Path, size: int, batch: int, precision: str, device: str, extra: list[str]):
    from fdtrain.bench.train import _synthetic
    from fdtrain.config import resolve
    from fdtrain.engine.trainer import Trainer

    data = _synthetic(root, size, batch * 16)
    cfg = resolve(None, [f"--data.train={data}", "--data.val=", "--data.backend=torch", f"--model.input_size={size}",
                         f"--data.batch_size={batch}", f"--train.mixed_precision={precision}", f"--run.device={device}",
                         f"--run.out_dir={root / 'runs'}", "--run.name=audit", "--logging.tensorboard=false",
                         "--logging.progress=off", "--data.num_workers=2", *extra])
    cfg.data.test = {}
    return Trainer(cfg)


def sync_audit(args: argparse.Namespace) -> int:
    import warnings

    import torch

    if not torch.cuda.is_available():
        return _skip("no CUDA device: torch.cuda.set_sync_debug_mode needs one")
    with tempfile.TemporaryDirectory(prefix="fdtrain-sync-audit-") as tmp:
        extra = [f"--model.forward={args.forward}", f"--loss.recon_reduction={args.recon_reduction}"]
        trainer = _tiny_trainer(Path(tmp), args.size, args.batch_size, args.precision, "cuda", extra)
        trainer.loader.set_epoch(0)
        trainer.model.train()
        it = iter(trainer.loader)
        for _ in range(args.warmup):  # allocator, cuDNN autotuning, lazy inits: not per-step costs
            trainer.train_step(next(it))
        torch.cuda.synchronize()
        where: dict[str, Counter] = {"train_step": Counter(), "loader": Counter()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(args.steps):
                    n0 = len(caught)
                    batch = next(it)
                    where["loader"].update(f"{w.filename}:{w.lineno}" for w in caught[n0:])
                    n1 = len(caught)
                    trainer.train_step(batch)
                    where["train_step"].update(f"{w.filename}:{w.lineno}" for w in caught[n1:])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        trainer.close()
    result = {"steps": args.steps, "forward": args.forward, "recon_reduction": args.recon_reduction,
              "precision": args.precision, "size": args.size, "batch_size": args.batch_size,
              "train_step_syncs": sum(where["train_step"].values()), "loader_syncs": sum(where["loader"].values()),
              "train_step_where": dict(where["train_step"].most_common(10)),
              "loader_where": dict(where["loader"].most_common(10))}
    print(f"synchronising calls in {args.steps} steps: train_step {result['train_step_syncs']}, "
          f"loader next() {result['loader_syncs']}")
    for k in ("train_step_where", "loader_where"):
        for loc, n in result[k].items():
            print(f"  {k.split('_where')[0]:>10}: {n:>3}  {loc}")
    _emit(result)
    return 0 if result["train_step_syncs"] == 0 else 1


def _jpegs(n: int, size: int) -> list[bytes]:
    """Face-crop-like JPEGs (smooth colour fields with grain), quality 95, as the shards hold them."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(30, 226, (6, 6, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def decode(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        return _skip("no CUDA device")
    device = "cuda" if cuda else "cpu"
    if cuda and _version("nvidia.dali"):
        import subprocess

        print("DALI imports: `fdtrain bench data --device cuda` (DALI mixed beside the CPU loaders)", flush=True)
        return subprocess.call([sys.executable, "-m", "fdtrain", "bench", "data", "--device", "cuda", "--samples",
                                str(args.samples), "--batch-size", str(args.batch_size), "--rounds", "2"])
    reason = ("nvidia.dali does not import here" if cuda else "dry run on the CPU")
    print(f"stand-in: torchvision.io.decode_jpeg on {device} ({reason}); DALI mixed is measured where DALI is "
          "installed", flush=True)
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in _jpegs(args.batch_size, args.size)]
    rates = []
    for r in range(args.rounds + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        imgs = decode_jpeg(data, device=device)
        if cuda:
            torch.cuda.synchronize()
        if r:  # the first round initialises nvJPEG
            rates.append(len(data) / (time.perf_counter() - t0))
    assert imgs[0].shape == (3, args.size, args.size), imgs[0].shape
    result = {"decoder": f"torchvision.io.decode_jpeg ({device})", "reason": reason, "images": len(data),
              "size": args.size, "images_per_s": max(rates), "rounds": [round(r, 1) for r in rates]}
    print(f"decode_jpeg on {device}: {result['images_per_s']:.0f} images/s ({args.size}x{args.size} JPEG q95, "
          f"batch {len(data)}, best of {args.rounds})")
    _emit(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fdtrain.bench.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name, fn in (("preflight", preflight), ("sync-audit", sync_audit), ("decode", decode)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--cpu-dry-run", action="store_true", help="allow a CPU-only machine (machinery test)")
        if name == "sync-audit":
            s.add_argument("--steps", type=int, default=5)
            s.add_argument("--warmup", type=int, default=3)
            s.add_argument("--size", type=int, default=299)
            s.add_argument("--batch-size", type=int, default=32)
            s.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"))
            s.add_argument("--forward", default="fused", choices=("fused", "two_pass", "fused_exact"))
            s.add_argument("--recon-reduction", default="paired", choices=("paired", "released"))
        if name == "decode":
            s.add_argument("--size", type=int, default=299)
            s.add_argument("--batch-size", type=int, default=256)
            s.add_argument("--rounds", type=int, default=5)
            s.add_argument("--samples", type=int, default=4096, help="DALI: images in the data bench")
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
