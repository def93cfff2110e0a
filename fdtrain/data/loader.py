"""The loader contract, shared by the DALI backend and the PyTorch fallback.

``build_loader(cfg, split, rank=, world_size=, device=, path=, dtype=) -> Loader``

* ``split == "train"``: each epoch reads the shards in an order permuted by (seed, epoch), the
  same on every rank (so the ranks' parts stay disjoint), through a shuffle buffer; shuffle, flips
  (``data.flip_p``) and noise are seeded by (seed, epoch, rank); batches
  ``{"x", "x_noisy", "label", "key"}`` (plus ``"x_noisy2"``, a second independent draw of X~, when
  ``model.forward=two_pass``); ``len(loader)`` steps per epoch,
  ``num_samples // (world_size * batch_size)``, the same on every rank.
* any other split (``"val"``, a name in ``data.test``, or any folder given as ``path``): read in
  order, no flip, no noise; every sample exactly once across ranks, padding removed, batches
  ``{"x", "label", "key"}`` (the last one may be smaller).

``x`` and ``x_noisy`` are ``(B, 3, S, S)`` in ``dtype`` on ``device`` with S = ``model.input_size``
and pixels ``(v / 255 - 0.5) / 0.5``; ``label`` is float32 0/1; ``key`` the samples' keys.
A loader saves its position (``state_dict``: epoch, step in epoch, skipped samples) and resumes
with the exact same order. Everything that can be refused (no such folder, empty split, stale or
missing index, too few shards for ranks x workers) is refused here, before training starts.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdtrain.config import ConfigError
from fdtrain.data import DataError

log = logging.getLogger("fdtrain.data")

IMAGE_EXTS = ("jpg", "jpeg", "png")  # the image component of a sample (system.md "Shard format")


# --------------------------------------------------------------------------------------------
# Shards of one split
# --------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """The tar files of one split, their DALI index files and sample counts (manifest order)."""

    split: str
    root: str
    tars: list[Path]
    indexes: list[Path]
    counts: list[int]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return len(self.tars)

    def rank_range(self, shard_id: int, num_shards: int) -> tuple[int, int]:
        """Global sample range [lo, hi) of one reader shard: DALI's split of the concatenated shards."""
        n = self.num_samples
        return n * shard_id // num_shards, n * (shard_id + 1) // num_shards

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(tar index, first, end) sample ranges inside tars that together cover [lo, hi)."""
        out, start = [], 0
        for i, c in enumerate(self.counts):
            a, b = max(lo, start), min(hi, start + c)
            if a < b:
                out.append((i, a - start, b - start))
            start += c
        return out


def split_path(cfg: Any, split: str, path: str | None) -> tuple[str, str]:
    """The folder (or tar pattern) of a split and the config field it came from."""
    if path is not None:
        return str(path), "path"
    if split in ("train", "val"):
        value, field = getattr(cfg.data, split), f"data.{split}"
    elif split in cfg.data.test:
        value, field = cfg.data.test[split], f"data.test.{split}"
    else:
        names = ["train", "val", *cfg.data.test]
        raise DataError(f"unknown split '{split}': expected one of {names} or an explicit path=")
    if not value:
        raise DataError(f"{field} is empty: set it to the shard folder of the '{split}' split")
    return value, field


def open_shards(location: str, split: str, *, field: str = "path", need_index: bool = True,
                missing_index: str = "build") -> ShardSet:
    """Check a split's shards before anything runs and return them in manifest order."""
    where = f"{field}={location}"
    root = Path(location)
    if root.is_dir():
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{where}: no manifest.json in this folder (write shards with `fdtrain shards make`)")
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = manifest["shards"]
            names = [e["name"] for e in entries]
            counts = [int(e["num_samples"]) for e in entries]
            total = int(manifest["num_samples"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{manifest_path}: unreadable manifest ({type(e).__name__}: {e}); "
                            "need num_samples and shards[{name, num_samples}]") from e
        if sum(counts) != total:
            raise DataError(f"{manifest_path}: num_samples={total} but its shards hold {sum(counts)}")
        tars = [root / n for n in names]
        index_names = [e.get("index") or Path(n).with_suffix(".idx").name for e, n in zip(entries, names)]
        missing = [str(t) for t in tars if not t.is_file()]
        if missing:
            raise DataError(f"{where}: shard(s) listed in manifest.json are missing: {', '.join(missing[:3])}"
                            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        # A shard of another size than the manifest recorded is named as such here, for either
        # backend, instead of surfacing mid-epoch as an undecodable image or a malformed index.
        for t, e in zip(tars, entries):
            want, have = e.get("bytes"), t.stat().st_size
            if isinstance(want, int) and have != want:
                kind = "truncated" if have < want else "stale"
                raise DataError(f"{t}: {kind} shard: {have} bytes on disk but manifest.json recorded {want} "
                                + ("(an incomplete copy or write?)" if have < want else
                                   "(rewritten after the manifest was made?)")
                                + "; copy it again or re-run `fdtrain shards make`")
    else:
        tars = [Path(p) for p in _expand_pattern(location)]
        if not tars:
            raise DataError(f"{where}: no such folder, and no tar file matches it as a pattern")
        counts = []  # filled from the index files below (no manifest)
        index_names = [t.with_suffix(".idx").name for t in tars]
        need_index = True
    if not tars or (counts and sum(counts) == 0):
        raise DataError(f"{where}: the '{split}' split is empty (0 samples)")
    beside = [t.with_name(n) for t, n in zip(tars, index_names)]
    indexes = [ensure_index(t, i, missing_index) for t, i in zip(tars, beside)] if need_index else beside
    if not need_index and counts and all(i.is_file() for i in beside):
        need_index = True  # the torch backend does not read them, but a stale one names a stale shard
    if need_index:
        found = [index_count(i) for i in indexes]
        if counts:
            stale = [(str(t), f, c) for t, f, c in zip(tars, found, counts) if f != c]
            if stale:
                t, f, c = stale[0]
                raise DataError(f"{t}: its index lists {f} samples but manifest.json says {c}: stale index "
                                "(delete the .idx file to rebuild it)")
        counts = found
    shards = ShardSet(split=split, root=str(location), tars=tars, indexes=indexes, counts=counts)
    if shards.num_samples == 0:
        raise DataError(f"{where}: the '{split}' split is empty (0 samples)")
    return shards


def _expand_pattern(pattern: str) -> list[str]:
    """Tar files matching a brace and/or glob pattern such as ``/d/shard-{000000..000009}.tar``."""
    import braceexpand  # a webdataset dependency

    out: list[str] = []
    for p in braceexpand.braceexpand(pattern):
        out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.isfile(p) else [])
    return out


def index_count(idx: Path) -> int:
    """Number of samples a DALI webdataset index (``v1.2 N`` header) lists."""
    with open(idx) as fh:
        head = fh.readline().split()
    if len(head) != 2 or not head[1].isdigit():
        raise DataError(f"{idx}: not a DALI webdataset index (header {' '.join(head)!r})")
    return int(head[1])


def ensure_index(tar: Path, beside: Path, policy: str) -> Path:
    """The DALI index of a tar: beside it, else in the user cache; built (with a warning) or refused."""
    if beside.is_file():
        return beside
    st = tar.stat()
    tag = hashlib.sha1(f"{tar.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fdtrain" / "wds-index" / f"{tag}.idx"
    if cached.is_file():
        return cached
    if policy != "build":
        raise DataError(f"{tar}: no DALI index {beside.name} beside it (data.missing_index=error); "
                        f"build it with `wds2idx {tar}` or set data.missing_index=build")
    for target in (beside, cached):
        try:
            build_index(tar, target)
        except OSError:
            continue  # read-only shard folder: fall back to the cache
        warnings.warn(f"{tar}: no DALI index; built {target} (write shards with `fdtrain shards make` to get one)",
                      stacklevel=3)
        log.warning("built missing DALI index %s", target)
        return target
    raise DataError(f"{tar}: no DALI index and none could be written beside it or in {cached.parent}")


def build_index(tar: Path, idx: Path) -> None:
    """Write a DALI index with the ``wds2idx`` module of the DALI wheel (atomic: ranks may race)."""
    import wds2idx

    idx.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=idx.parent, prefix=f".{idx.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with wds2idx.IndexCreator(str(tar), tmp, verbose=False) as creator:
            creator.create_index()
        os.replace(tmp, idx)
    except ValueError as e:  # wds2idx: "Webdataset Tar File empty"
        raise DataError(f"{tar}: cannot index ({e})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# Per-sample helpers shared by both backends
# --------------------------------------------------------------------------------------------
def sample_key(name: str) -> str:
    """WebDataset key of a member name: everything before the first dot of the last path part."""
    dot = name.find(".", name.rfind("/") + 1)
    return name if dot < 0 else name[:dot]


def parse_label(raw: bytes, key: str, shard: str) -> float:
    """The ``cls`` component: ASCII "0" (real) or "1" (fake)."""
    text = raw.rstrip(b"\0").strip()
    if text not in (b"0", b"1"):
        raise DataError(f"shard {shard}, key {key}: cls must be '0' or '1', got {text[:20]!r}")
    return float(text == b"1")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, step, ...), stable across runs and processes."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


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


# --------------------------------------------------------------------------------------------
# Class balance (data.balance): the selection is made on the index files, so both backends read it
# --------------------------------------------------------------------------------------------
class Balance:
    """Which training samples an epoch reads, written as DALI index files over the same tars.

    ``subsample_fakes`` (the released code for Celeb-DF and WildDeepfake): every real, and as many
    fakes as reals drawn once without replacement with ``run.seed``: one selection for the whole run.
    ``weighted``: each epoch draws as many samples as the split holds, with replacement, each draw
    real or fake with probability 1/2 then uniform within its class, seeded by (seed, epoch).
    Both are pure functions of the seed (and epoch), the same on every rank, so resume replays them.
    Labels come from each sample's ``cls`` member, read at the offset its index line gives.
    """

    def __init__(self, shards: ShardSet, policy: str, seed: int):
        self.full, self.policy, self.seed = shards, policy, seed
        self.lines = [Path(i).read_text().splitlines()[1:] for i in shards.indexes]
        labels = [_labels_of(str(t), lines) for t, lines in zip(shards.tars, self.lines)]
        self.tar_of = np.concatenate([np.full(len(v), i) for i, v in enumerate(labels)])  # (N,)
        self.line_of = np.concatenate([np.arange(len(v)) for v in labels])  # (N,)
        self.is_fake = np.concatenate(labels).astype(bool)  # (N,)
        self.n_real, self.n_fake = int((~self.is_fake).sum()), int(self.is_fake.sum())
        if min(self.n_real, self.n_fake) == 0:
            raise DataError(f"data.balance={policy}: the training split {shards.root} holds {self.n_real} real and "
                            f"{self.n_fake} fake samples; balancing needs both")
        self._tmp = tempfile.TemporaryDirectory(prefix="fdtrain-balance-")
        self._cache: dict[int, tuple[ShardSet, int]] = {}  # epoch -> (shards, reals); weighted only
        self.fixed = self._subsample() if policy == "subsample_fakes" else None

    def _subsample(self) -> tuple[ShardSet, int]:
        fakes = np.flatnonzero(self.is_fake)
        keep = fakes
        if len(fakes) > self.n_real:
            rng = np.random.default_rng(mix_seed(self.seed, 0xBA1A))
            keep = np.sort(rng.choice(fakes, size=self.n_real, replace=False))
        picked = np.sort(np.concatenate([np.flatnonzero(~self.is_fake), keep]))
        return self._write(picked, "subsample")

    def shards(self, epoch: int) -> ShardSet:
        """The shards an epoch reads (subsample_fakes: the same every epoch)."""
        return self._selection(epoch)[0]

    def share(self, epoch: int) -> tuple[int, int]:
        """(real, fake) samples the epoch's selection holds."""
        sel, real = self._selection(epoch)
        return real, sel.num_samples - real

    def _selection(self, epoch: int) -> tuple[ShardSet, int]:
        if self.fixed is not None:
            return self.fixed
        if epoch not in self._cache:
            rng = np.random.default_rng(mix_seed(self.seed, epoch, 0xBA1B))
            n = len(self.is_fake)
            fake_draw = rng.random(n) < 0.5
            reals, fakes = np.flatnonzero(~self.is_fake), np.flatnonzero(self.is_fake)
            picked = np.where(fake_draw, fakes[rng.integers(0, len(fakes), n)], reals[rng.integers(0, len(reals), n)])
            for old in [e for e in self._cache if e < epoch - 1]:  # keep this epoch's and the previous files
                for idx in self._cache.pop(old)[0].indexes:
                    Path(idx).unlink(missing_ok=True)
            self._cache[epoch] = self._write(picked, f"e{epoch}")
        return self._cache[epoch]

    def _write(self, picked: np.ndarray, tag: str) -> tuple[ShardSet, int]:
        """Index files holding the picked samples (global sample numbers; repeats allowed), tar by tar."""
        tars, indexes, counts, real = [], [], [], 0
        for i in range(self.full.num_shards):
            mine = picked[self.tar_of[picked] == i]
            if not len(mine):
                continue
            out = Path(self._tmp.name) / f"{tag}-{i:06d}.idx"
            body = [self.lines[i][j] for j in self.line_of[mine]]
            out.write_text(f"v1.2 {len(body)}\n" + "\n".join(body) + "\n")
            tars.append(self.full.tars[i])
            indexes.append(out)
            counts.append(len(body))
            real += int((~self.is_fake[mine]).sum())
        return ShardSet(split=self.full.split, root=self.full.root, tars=tars, indexes=indexes, counts=counts), real


def _labels_of(tar: str, lines: list[str]) -> np.ndarray:
    """0/1 label of each sample of a tar, from the ``cls`` member its index line points at."""
    out = np.zeros(len(lines), dtype=np.uint8)
    with open(tar, "rb") as fh:
        for j, line in enumerate(lines):
            parts = line.split()
            cls = next(((int(parts[k + 1]), int(parts[k + 2])) for k in range(0, len(parts) - 3, 4)
                        if parts[k] == "cls"), None)
            key = sample_key(parts[3]) if len(parts) > 3 else "?"
            if cls is None:
                raise DataError(f"shard {tar}, key {key}: no cls member (data.balance needs each sample's label)")
            fh.seek(cls[0])
            out[j] = int(parse_label(fh.read(cls[1]), key, tar))
    return out


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------
class Loader:
    """One split for one rank; backends implement ``_batches`` and ``_eval_steps``."""

    backend = "?"

    def __init__(self, cfg: Any, shards: ShardSet, *, train: bool, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.cfg, self.shards, self.train = cfg, shards, train
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype
        self.batch_size = cfg.data.batch_size if train else cfg.data.eval_batch_size
        self.size = cfg.model.input_size
        self.seed = cfg.run.seed
        self.epoch = 0
        self.step_in_epoch = 0
        self.skipped: dict[str, str] = {}  # key -> "shard: reason", with data.on_corrupt=skip
        self.buffers = BufferPool()  # X and X~ of CPU batches
        self.balance: Balance | None = None  # data.balance: set by build_loader (training)
        self.num_samples = shards.num_samples
        if train:
            self.steps_per_epoch = self.num_samples // (world_size * self.batch_size)
        else:
            self.steps_per_epoch = self._eval_steps()

    # --- contract ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; setting the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.step_in_epoch = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "backend": self.backend,
                "seed": self.seed, "world_size": self.world_size, "skipped": dict(self.skipped)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("world_size", self.world_size) != self.world_size:
            log.warning("data: resuming with %d ranks instead of %d: the sample order will differ",
                        self.world_size, sd["world_size"])
        self.epoch, self.step_in_epoch = int(sd["epoch"]), int(sd["step_in_epoch"])
        self.skipped.update(sd.get("skipped", {}))
        if self.train and self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch (the rest of it after ``load_state_dict``); then the epoch counter moves on."""
        epoch, skip = self.epoch, (self.step_in_epoch if self.train else 0)
        if skip:
            log.info("data[%s]: resuming epoch %d at step %d/%d", self.shards.split, epoch, skip, self.steps_per_epoch)
        want = self.steps_per_epoch - skip if self.train else None
        got = 0
        with contextlib.closing(self._batches(epoch, skip)) as batches:  # stops workers/pipelines on early exit
            for raw in batches:
                if want is not None and got == want:
                    break
                step = skip + got
                out = self._finish(raw, epoch, step)
                got += 1
                if self.train:
                    self.step_in_epoch = step + 1  # counted when handed out: a checkpoint after it skips it
                yield out
        if want is not None and got != want:  # a short rank would hang the others at the next all-reduce
            raise DataError(f"data[{self.shards.split}] rank {self.rank}: epoch {epoch} ended after {skip + got} "
                            f"of {self.steps_per_epoch} steps ({self.backend} backend)")
        if self.train:
            self.epoch, self.step_in_epoch = epoch + 1, 0

    # --- shared post-processing ---------------------------------------------------------------
    def _finish(self, raw: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
        """Move to the device, normalize uint8 input, cast, and add X~ in training."""
        x = raw["x"].to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize_uint8(x, self.buffers)
        x = x.to(self.dtype)
        out = {"x": x, "label": raw["label"].to(self.device, non_blocking=True), "key": raw["key"]}
        if self.train:
            # model.forward=two_pass runs the encoder twice per step, each on its own draw of X~ (as
            # the released code draws the noise inside each forward): "x_noisy2" is the second.
            views = ("x_noisy", "x_noisy2")[:getattr(self.cfg.model, "noisy_views", 1)]
            for v, name in enumerate(views):
                out[name] = add_gated_noise(x, self.cfg.data.noise_p, self.cfg.data.noise_std,
                                            self.noise_generator(epoch, step, v), self.buffers)
        return out

    def noise_generator(self, epoch: int, step: int, view: int = 0) -> torch.Generator:
        """The generator of X~ for one batch: a function of (seed, epoch, rank, step, view) only."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(mix_seed(self.seed, epoch, self.rank, step, 0x4E01 + view))

    def _record_skip(self, key: str, shard: str, reason: str) -> None:
        if key not in self.skipped:
            self.skipped[key] = f"{shard}: {reason}"
            log.warning("data[%s]: skipped undecodable sample %s in %s (%s); %d skipped so far",
                        self.shards.split, key, shard, reason, len(self.skipped))

    def selected_shards(self, epoch: int) -> ShardSet:
        """The shards (and index files) epoch ``epoch`` reads: data.balance's selection, or all."""
        if self.balance is None:
            return self.shards
        shards = self.balance.shards(epoch)
        if getattr(self, "_balance_logged", None) != epoch:
            self._balance_logged = epoch
            real, fake = self.balance.share(epoch)
            log.info("data[%s] epoch %d: balance=%s selects %d real + %d fake samples (%.1f%% fake)", shards.split,
                     epoch, self.balance.policy, real, fake, 100.0 * fake / max(1, real + fake))
        if self.backend == "torch" and shards.num_shards < self.world_size * max(1, self.cfg.data.num_workers):
            raise DataError(f"data.balance={self.balance.policy}: epoch {epoch} selects samples from "
                            f"{shards.num_shards} shard(s), fewer than {self.world_size} rank(s) x data.num_workers "
                            "for the PyTorch fallback: write smaller shards, lower data.num_workers, or use DALI")
        return shards

    # --- backends -----------------------------------------------------------------------------
    def describe(self) -> str:
        """Backend settings for the one log line that announces the loader."""
        return ""

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def _eval_steps(self) -> int:
        lo, hi = self.shards.rank_range(self.rank, self.world_size)
        return math.ceil((hi - lo) / self.batch_size)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why) for data.backend = auto | dali | torch."""
    if requested == "torch":
        return "torch", "data.backend=torch"
    if dali_available():
        return "dali", f"data.backend={requested}"
    if requested == "dali":
        raise DataError("data.backend=dali but nvidia.dali is not importable: "
                        "pip install 'fdtrain[dali]' or set data.backend=torch (or auto)")
    return "torch", "data.backend=auto and DALI is not installed: PyTorch fallback"


def build_loader(cfg: Any, split: str, *, rank: int = 0, world_size: int = 1, device: Any = None,
                 path: str | None = None, dtype: Any = None) -> Loader:
    """Check the split's shards and settings, pick the backend (one log line) and build the loader."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world_size {world_size}")
    d = cfg.data
    for name in ("prefetch", "num_threads", "shuffle_buffer"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name}: must be >= 1, got {getattr(d, name)}")
    if d.noise_std < 0:
        raise ConfigError(f"data.noise_std: must be >= 0, got {d.noise_std}")
    train = split == "train"
    backend, why = choose_backend(cfg.data.backend)
    location, field = split_path(cfg, split, path)
    balancing = train and getattr(d, "balance", "none") != "none"
    shards = open_shards(location, split, field=field, need_index=backend == "dali" or balancing,
                         missing_index=cfg.data.missing_index)
    balance = Balance(shards, d.balance, cfg.run.seed) if balancing else None
    if balance is not None and balance.fixed is not None:
        shards = balance.fixed[0]  # subsample_fakes: the run's epochs all read this selection
        log.info("data[train]: balance=subsample_fakes keeps %d real and %d of %d fake samples (seed %d)",
                 balance.n_real, shards.num_samples - balance.n_real, balance.n_fake, cfg.run.seed)
    batch = cfg.data.batch_size if train else cfg.data.eval_batch_size
    if train and shards.num_samples < world_size * batch:
        raise DataError(f"{field}={location}: {shards.num_samples} samples cannot fill one step of "
                        f"{world_size} rank(s) x data.batch_size={batch}")
    if backend == "torch" and train:
        need = world_size * max(1, cfg.data.num_workers)
        if shards.num_shards < need:
            raise DataError(
                f"{field}={location}: {shards.num_shards} shard(s) for {world_size} rank(s) x "
                f"{max(1, cfg.data.num_workers)} worker(s) (data.num_workers): the PyTorch fallback splits whole "
                f"shards between ranks and workers, so it needs at least {need}; write smaller shards, lower "
                "data.num_workers, or use the DALI backend (which splits by sample)")
    if backend == "dali":
        from fdtrain.data.dali_pipeline import DaliLoader as cls
    else:
        from fdtrain.data.torch_loader import TorchLoader as cls
    loader = cls(cfg, shards, train=train, rank=rank, world_size=world_size, device=device, dtype=dtype)
    loader.balance = balance
    log.info("data[%s] rank %d/%d: backend=%s (%s), %s, %d samples in %d shards, batch %d, %d steps/epoch",
             split, rank, world_size, backend, why, loader.describe(), shards.num_samples, shards.num_shards,
             batch, loader.steps_per_epoch)
    return loader
