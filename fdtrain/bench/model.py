"""``fdtrain bench model``: forward+backward images/s of FakeDiffer beside plain Xception.

Runs timm legacy_xception (the baseline), FakeDiffer ``forward: fused`` and ``forward: two_pass``
at the same batch and input size in one process, one training step each in turn (round robin),
so a machine shared with other work slows all of them alike and the ratios stay meaningful.
Reports the median step time per model, images/s, and time ratios to the baseline; prints a
table and one JSON line, and writes the JSON to ``--json PATH`` when asked. On the CPU it also
reports process CPU time per step, which other processes on a shared machine disturb far less than
wall time (run with ``--threads 1`` for the steadiest figures).

No torch import at module level: ``fdtrain --help`` stays instant.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from fdtrain.bench import emit_result
from fdtrain.config import ModelConfig

VARIANTS = ("xception", "fused", "two_pass")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default 4: ~1-2 min on 2 CPU cores)")
    p.add_argument("--size", type=int, default=ModelConfig.input_size,
                   help="input side in pixels (299 FF++, 224 WildDeepfake)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype (bf16 on a CPU without AMX is ~10x slower than fp32)")
    p.add_argument("--models", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (xception is the baseline)")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                   help="model.channels_last for every model (inputs arrive NCHW, as from the loaders)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-onednn-pointwise", dest="onednn_pointwise", action="store_false",
                   help="CPU, 1 thread, batch < 16: leave the 1x1 convolutions on torch's im2col path "
                        "(by default they run on oneDNN, as train.onednn_pointwise does in training)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model first (compile time goes into the warmup steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default="", help="also write the JSON result to PATH")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(name: str, size: int, channels_last: bool):
    from fdtrain.models import create_model

    if name == "xception":
        return create_model(variant="xception", input_size=size, channels_last=channels_last)
    return create_model(variant="fakediffer", forward=name, input_size=size, channels_last=channels_last)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from fdtrain.data.augment import class_rows
    from fdtrain.losses import FakeDifferLoss
    from fdtrain.models import route_pointwise_to_onednn, torch_picks_slow_pointwise

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        print(f"fdtrain bench model: --models takes a subset of {list(VARIANTS)}, got {args.models!r}", file=sys.stderr)
        return 2
    if min(args.batch_size, args.size, args.steps) < 1 or args.warmup < 0:
        print("fdtrain bench model: --batch-size, --size and --steps must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.batch_size < 2:
        print("fdtrain bench model: --batch-size must be >= 2 (the fusion MLP's BatchNorm trains on the batch)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels, for every model alike
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    torch.manual_seed(args.seed)
    b, s = args.batch_size, args.size
    x = torch.rand(b, 3, s, s, device=device) * 2 - 1
    x_noisy = (x + 1e-3 * torch.randn_like(x)).clamp(-1, 1)
    labels_host = (torch.arange(b) % 2).float()  # half real, half fake
    labels, rows = labels_host.to(device), class_rows(labels_host, device)  # rows as the loader makes them
    loss_fn = FakeDifferLoss()
    channels_last = args.memory_format == "channels_last"
    models = {n: _build(n, s, channels_last).to(device).train() for n in names}
    routed = 0
    if args.onednn_pointwise and torch_picks_slow_pointwise(device, b):  # as the trainer does
        routed = sum(route_pointwise_to_onednn(m) for m in models.values())
    if args.compile:
        models = {n: torch.compile(m) for n, m in models.items()}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}

    def step(name: str) -> tuple[float, float]:
        model = models[name]
        model.zero_grad(set_to_none=True)
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x, x_noisy, labels, rows=rows)
            loss = loss_fn(out, x, labels, rows=rows)["total"]
        loss.backward()
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    total = (args.warmup + args.steps) * len(names)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench model", unit="step", file=sys.stderr, leave=False)
    except ImportError:  # tqdm is a core dependency; keep the bench usable without it anyway
        bar = None
    for i in range(args.warmup + args.steps):
        for n in names:  # round robin: background load hits every model alike
            dt, dc = step(n)
            if i >= args.warmup:
                times[n].append(dt)
                cpu_times[n].append(dc)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    base = "xception" if "xception" in names else None
    med = {n: statistics.median(t) for n, t in times.items()}
    cpu = {n: statistics.median(t) for n, t in cpu_times.items()}
    results = {n: {"step_s": med[n], "images_per_s": b / med[n], "params": params[n],
                   "step_s_all": [round(t, 5) for t in times[n]]} for n in names}
    if device.type == "cpu":
        for n in names:
            results[n]["cpu_s"] = cpu[n]
    ratios, cpu_ratios = {}, {}
    pairs = [(n, base) for n in names if base and n != base]
    if "fused" in names and "two_pass" in names:
        pairs.append(("two_pass", "fused"))
    for n, ref in pairs:
        ratios[f"{n}_vs_{ref}"] = med[n] / med[ref]
        cpu_ratios[f"{n}_vs_{ref}"] = cpu[n] / cpu[ref]
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    result = {
        "bench": "model", "device": device_name, "precision": args.precision, "batch_size": b, "size": s,
        "steps": args.steps, "warmup": args.warmup, "memory_format": args.memory_format,
        "compiled": bool(args.compile), "onednn_pointwise_convs": routed, "torch": torch.__version__,
        "results": results, "time_ratios": ratios,
    }
    if device.type == "cpu":
        result["cpu_time_ratios"] = cpu_ratios
    else:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30  # all models together

    print(f"fdtrain bench model: forward+backward, batch {b}, {s}x{s}, {args.precision}, {args.memory_format}"
          f"{', compiled' if args.compile else ''}{f', {routed} 1x1 convs on oneDNN' if routed else ''}, "
          f"{device_name}, median of {args.steps} steps")
    on_cpu = device.type == "cpu"
    print(f"{'model':<12} {'params':>8} {'step ms':>10} {'images/s':>10} {'time vs xception':>17}"
          + (f" {'cpu ms':>10} {'cpu vs xception':>16}" if on_cpu else ""))
    for n in names:
        r = results[n]
        ratio = f"{med[n] / med[base]:.2f}x" if base else "-"
        line = f"{n:<12} {r['params'] / 1e6:>7.2f}M {r['step_s'] * 1e3:>10.1f} {r['images_per_s']:>10.2f} {ratio:>17}"
        if on_cpu:
            line += f" {cpu[n] * 1e3:>10.1f} {(f'{cpu[n] / cpu[base]:.2f}x' if base else '-'):>16}"
        print(line)
    if "two_pass_vs_fused" in ratios:
        print(f"two_pass / fused: {ratios['two_pass_vs_fused']:.2f}x"
              + (f" (cpu time {cpu_ratios['two_pass_vs_fused']:.2f}x)" if on_cpu else ""))
    emit_result(result, args.json)
    return 0
