#!/usr/bin/env python3
"""Is ``train.compile`` the same function as eager? One FakeDiffer training step (train mode, BatchNorm
on batch statistics, dropout off), eager and ``torch.compile``d, from the same weights on the same
batch, in float64 (or float32), on the CPU; prints the largest differences of the loss terms, of every
parameter's gradient (relative to that gradient's largest value), of the gradient norm and of the BN
buffers, as one JSON line.

    python launch/compile_check.py [--dtype float64|float32] [--size 64] [--batch 2] [--threads 1]

In float64 a difference is the compiled graph's math, not rounding: that is the check. In float32 the
two are apart by rounding that train-mode BatchNorm over few values per channel amplifies (at 64 px
and batch 2 the exit flow normalises 8 values per channel). Compiling takes minutes on a CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from fdtrain.losses import FakeDifferLoss
    from fdtrain.models import create_model

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    eager = create_model(input_size=args.size, dropout=0.0, encoder_dropout=0.0).train().to(dtype)
    plain = copy.deepcopy(eager)
    compiled = torch.compile(plain)
    g = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(dtype)
    y = (torch.arange(args.batch) % 2).to(dtype)  # half real, half fake
    loss_fn = FakeDifferLoss()
    res, secs = [], []
    for model, params in ((eager, eager), (compiled, plain)):
        t0 = time.perf_counter()
        losses = loss_fn(model(x, x, y), x, y)
        losses["total"].backward()
        secs.append(time.perf_counter() - t0)
        grads = {k: p.grad for k, p in params.named_parameters()}
        norm = float(torch.stack([v.double().norm() for v in grads.values()]).norm())
        res.append((losses, grads, norm, dict(params.named_buffers())))
    (la, ga, na, ba), (lc, gc, nc, bc) = res
    grad_rel = {k: float((ga[k] - gc[k]).abs().max() / ga[k].abs().max().clamp(min=1e-30)) for k in ga}
    worst = max(grad_rel, key=grad_rel.get)
    out = {
        "dtype": args.dtype, "size": args.size, "batch": args.batch, "torch": torch.__version__,
        "loss_abs_diff": {k: float((la[k] - lc[k]).detach().abs()) for k in la},
        "grad_norm": [na, nc], "grad_norm_rel_diff": abs(na - nc) / na,
        "grad_max_rel_diff": grad_rel[worst], "grad_max_rel_diff_param": worst,
        "buffer_max_abs_diff": max(float((ba[k].double() - bc[k].double()).abs().max()) for k in ba),
        "eager_s": secs[0], "compile_and_step_s": secs[1],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
