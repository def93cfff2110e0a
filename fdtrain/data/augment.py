"""Augmentation on the output device, shared by both backends: uint8 -> normalised float, and X~.

``normalize_uint8``: pixels ``(v / 255 - 0.5) / 0.5`` (what DALI's crop_mirror_normalize computes
with mean = std = 127.5, and what serving's preprocessing does). ``add_gated_noise``: the noisy
view X~ of model.md "Input". ``BufferPool``: the CPU batch buffers both write into.
``class_rows``: a training batch's row indices per class, made from the host's labels.
"""
from __future__ import annotations

import sys

import numpy as np
import torch


class BufferPool:
    """CPU batch buffers handed out again once nothing references them any more.

    A fresh 32-image float batch at 299 px is 34 MB, above glibc's mmap ceiling (32 MB): every
    new one is mapped and faulted in page by page (~25 ms of a 2-core machine per batch, as much as
    the noise draws). A buffer is a NumPy array behind ``torch.from_numpy``; every tensor and view
    made from it keeps one reference to the array, so a reference count back at the pool's own
    means no batch, view or saved tensor can still see it.
    """

    def __init__(self, size: int = 8):
        self.size, self.arrays = size, []

    def empty_like(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised tensor like ``x`` (same shape and memory layout: NCHW or channels_last)."""
        dtype = dtype or x.dtype
        dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        if x.device.type != "cpu" or not dense or dtype not in (torch.float32, torch.float16):
            return torch.empty_like(x, dtype=dtype)
        np_dtype = np.float32 if dtype == torch.float32 else np.float16
        order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # dims from outermost in memory
        shape = tuple(x.shape[d] for d in order)
        found = None
        for a in self.arrays:  # free: referenced by the list, the loop variable and getrefcount only
            if a.shape == shape and a.dtype == np_dtype and sys.getrefcount(a) <= 3:
                found = a
                break
        if found is None:
            found = np.empty(shape, np_dtype)
            if len(self.arrays) < self.size:
                self.arrays.append(found)
        return torch.from_numpy(found).permute(*[order.index(d) for d in range(x.dim())])


def normalize_uint8(x: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
    """uint8 pixels -> float32 (v / 255 - 0.5) / 0.5 = v / 127.5 - 1.

    A plain conversion then in-place float ops: mixed uint8/float kernels are ~2x slower on the CPU.
    On the CPU in NumPy, single-threaded, for the reason given in ``add_gated_noise``.
    """
    if x.device.type != "cpu":
        return x.float().mul_(1.0 / 127.5).sub_(1.0)
    out = pool.empty_like(x, torch.float32) if pool is not None else torch.empty_like(x, dtype=torch.float32)
    o = out.numpy()
    np.multiply(x.numpy(), np.float32(1.0 / 127.5), out=o, dtype=np.float32)
    np.subtract(o, np.float32(1.0), out=o)
    return out


def add_gated_noise(x: torch.Tensor, p: float, std: float, generator: torch.Generator,
                    pool: BufferPool | None = None) -> torch.Tensor:
    """X~ = clip(X + N(0, std), -1, 1) for each sample with probability p; X elsewhere (model.md, Input).

    Applied on the output device for both backends: the noise draws cost ~10 ms/image in DALI's CPU
    operators, and producing X~ in workers would double the host-to-device traffic.
    """
    gate = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    if x.device.type == "cuda":  # no host sync: draw for all and select
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        noisy = (x.float() + std * noise).clamp_(-1.0, 1.0).to(x.dtype)
        return torch.where(gate.view(-1, 1, 1, 1), noisy, x)
    gated = gate.tolist()  # on the CPU: draw only for the gated samples, straight into the output
    if not any(gated) or std == 0:
        return x  # X~ = X: no copy (batches are never modified in place downstream)
    if x.dtype not in (torch.float32, torch.float16):  # NumPy has no bfloat16
        noise = torch.randn((sum(gated), *x.shape[1:]), generator=generator, dtype=torch.float32)
        rows = gate.nonzero().squeeze(1)
        noisy = torch.add(x.index_select(0, rows), noise, alpha=std, out=noise).clamp_(-1.0, 1.0)
        return x.clone().index_copy_(0, rows, noisy.to(x.dtype))
    # Per row, in NumPy (single-threaded) and in place in the output: torch's elementwise ops open
    # intra-op parallel regions that compete with the loader's own threads/workers for the cores
    # (on a busy 2-core machine 75-210 ms per 32-image batch at 299 px with 2 intra-op threads,
    # 24 ms with one); torch.randn itself is serial.
    out = pool.empty_like(x) if pool is not None else torch.empty_like(x)
    src, dst = x.numpy(), out.numpy()
    direct = x.dtype == torch.float32 and out[0].is_contiguous()  # else a scratch row (fp16, channels_last)
    noise = None if direct else torch.empty(x.shape[1:], dtype=torch.float32)
    for i, g in enumerate(gated):
        if not g:
            np.copyto(dst[i], src[i])
            continue
        n = out[i] if noise is None else noise  # drawn in (C,H,W) order whatever the layout
        torch.randn(n.shape, generator=generator, out=n)
        a = n.numpy()
        a *= np.float32(std)
        np.add(a, src[i], out=dst[i])
        np.clip(dst[i], -1.0, 1.0, out=dst[i])
    return out


def class_rows(labels: torch.Tensor, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """{"real": (n_r,), "fake": (n_f,)} int64 row indices of a batch's classes (label < 0.5 = real).

    Made from the labels where they are read, on the host, then copied to ``device`` without
    blocking: the sizes are host metadata, so the steps that split a batch by class (two_pass's
    decoder pass, the released reconstruction reduction) need no ``nonzero`` on the device, which
    would wait for the GPU to finish the step so far.
    """
    is_real = labels.reshape(-1) < 0.5  # (B,)
    rows = {"real": is_real.nonzero().squeeze(1), "fake": (~is_real).nonzero().squeeze(1)}
    if device is not None:
        rows = {k: v.to(device, non_blocking=True) for k, v in rows.items()}
    return rows
