"""``fdtrain bench serve``: images/s of `fdtrain predict`'s two scoring paths, side by side.

Scores the same face crops (320 px, as ingestion and predict make them) through the same
Predictor with the PyTorch model (eager, fp32, the model's channels_last setting) and with its ONNX
export in ONNX Runtime (CPU provider, or CUDA when present), batch by batch in turn (round robin),
so background load on a shared machine hits both alike. Each timing covers preprocessing
(resize, normalisation) and the model; face detection and video decoding are the same code for
both paths and are left out. Without ``--checkpoint`` a randomly initialised FakeDiffer at
``--size`` is used (speed does not depend on the weights). Both paths use ``--threads`` threads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fdtrain.bench import emit_result


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="", help="model.pt / checkpoint / run folder (default: a random FakeDiffer)")
    p.add_argument("--size", type=int, default=299, help="input size of the random model (ignored with --checkpoint)")
    p.add_argument("--variant", default="fakediffer", help="model.variant of the random model")
    p.add_argument("--batch-size", type=int, default=8, help="crops per scoring call (predict's --batch-size)")
    p.add_argument("--batches", type=int, default=4, help="timed batches per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per path first")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of both runtimes (0: all cores)")
    p.add_argument("--device", default="cpu", help="cpu, or auto/cuda (ONNX Runtime needs onnxruntime-gpu)")
    p.add_argument("--json", metavar="PATH", default="", help="also write the JSON result to PATH")


def run_bench(args: argparse.Namespace) -> int:
    import os

    import numpy as np
    import torch

    from fdtrain.engine.predict import PredictOptions, Predictor, TorchLogits
    from fdtrain.serving.export import export
    from fdtrain.serving.runtime import OnnxModel

    if min(args.batch_size, args.batches) < 1 or args.warmup < 0:
        print("fdtrain bench serve: --batch-size and --batches must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="fdtrain-bench-serve-") as tmp:
        checkpoint = args.checkpoint or _random_model(Path(tmp), args.variant, args.size)
        onnx_path = Path(tmp) / "model.onnx"
        side = export(checkpoint, "onnx", onnx_path)
        from fdtrain.inference import load_model

        model, cfg = load_model(checkpoint)
        opts = PredictOptions(batch_size=args.batch_size)
        paths = {"pytorch": Predictor(TorchLogits(model, device), cfg.model.input_size, opts),
                 "onnxruntime": Predictor(OnnxModel(onnx_path, device=str(device.type), threads=threads),
                                          side["input_size"], opts)}
        rng = np.random.default_rng(0)
        crops = [rng.integers(0, 256, (320, 320, 3), dtype=np.uint8) for _ in range(args.batch_size)]
        times: dict[str, list[float]] = {n: [] for n in paths}
        scores: dict[str, list[float]] = {}
        for i in range(args.warmup + args.batches):
            for name, predictor in paths.items():  # round robin
                t0 = time.perf_counter()
                scores[name] = predictor.scores(crops)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    agree = float(np.max(np.abs(np.asarray(scores["pytorch"]) - np.asarray(scores["onnxruntime"]))))
    results = {n: {"batch_s": med[n], "images_per_s": args.batch_size / med[n],
                   "batch_s_all": [round(t, 4) for t in times[n]]} for n in paths}
    import onnxruntime

    result = {"bench": "serve", "device": f"{device.type} ({threads} threads)", "size": side["input_size"],
              "variant": cfg.model.variant, "batch_size": args.batch_size, "batches": args.batches,
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "results": results,
              "onnx_vs_pytorch_speedup": med["pytorch"] / med["onnxruntime"], "max_score_diff": agree}
    print(f"fdtrain bench serve: {cfg.model.variant} at {side['input_size']} px, batches of {args.batch_size} "
          f"320-px crops (preprocessing + model), {result['device']}, median of {args.batches}")
    print(f"{'path':<12} {'batch ms':>10} {'images/s':>10}")
    for n, r in results.items():
        print(f"{n:<12} {r['batch_s'] * 1e3:>10.1f} {r['images_per_s']:>10.2f}")
    print(f"onnxruntime / pytorch speed: {result['onnx_vs_pytorch_speedup']:.2f}x; scores agree to {agree:.1e}")
    emit_result(result, args.json)
    return 0


def _random_model(folder: Path, variant: str, size: int) -> Path:
    """A model.pt of a randomly initialised model (fdtrain's model file format)."""
    from fdtrain.config import resolve
    from fdtrain.model_file import write_model_file
    from fdtrain.models import create_model_from_config

    cfg = resolve(None, {"model": {"variant": variant, "input_size": size, "pretrained": False}})
    model = create_model_from_config(cfg.model).eval()
    path = folder / "model.pt"
    write_model_file(path, config=cfg.to_dict(), state_dict=model.state_dict(), step=0, epoch=0, metrics={})
    return path
