"""PyTorch fallback: WebDataset tar streams decoded in DataLoader workers; the same function as DALI.

Training: each epoch the shard list is permuted with (seed, epoch), the same on every rank; rank r
takes every world-th shard of it (node split) and worker w every n-th of those (worker split). Each
worker cycles over its shards forever through a seeded shuffle buffer, and the loader takes exactly
``steps_per_epoch`` batches, so every rank runs the same number of steps whatever its shards hold.
Evaluation: rank r reads the global sample range DALI's reader would give it (contiguous, balanced
to one sample), cut into contiguous parts for the workers; nothing is padded.

Workers decode with libjpeg-turbo (``torchvision.io.decode_image``), resize uint8 with the
antialiased bilinear filter (a triangle filter over the source footprint, as DALI's linear+antialias
and PIL's BILINEAR), flip uint8, and batch into shared memory. Batches cross to the main process and
to the GPU as uint8, a quarter of the bytes of float32 (on this kind of machine the page faults of a
fresh float32 batch in shared memory cost more than decoding it); the loader converts on the device.

Resume: the k-th batch of an epoch always comes from logical worker k mod n as its (k div n)-th
batch; a resumed epoch renumbers the workers so the DataLoader's round-robin continues at k, and
each worker drops the raw samples of its batches already consumed before decoding anything.
(With ``data.on_corrupt=skip``, samples skipped before the resume point shift it by that many.)
"""
from __future__ import annotations

import contextlib
import math
import random
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from webdataset.tariterators import tarfile_samples

from fdtrain.data.format import (
    IMAGE_EXTS,
    DataError,
    ShardSet,
    index_count,
    line_key,
    parse_index_line,
    parse_label,
    read_index,
    read_member,
)
from fdtrain.data.loading.base import Loader
from fdtrain.data.loading.sampling import mix_seed


# --------------------------------------------------------------------------------------------
# Per-sample work (in the workers)
# --------------------------------------------------------------------------------------------
def decode_sample(sample: dict[str, Any], size: int, flip: bool) -> tuple[torch.Tensor, float]:
    """(uint8 (3,S,S), label) of one raw WebDataset sample; DataError naming shard and key."""
    img, label = decode_raw(sample)
    img = resize_square(img, size)
    if flip:
        img = img.flip(-1)
    return img, label


def resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3,H,W) -> (3,S,S), antialiased bilinear (the loaders' resize)."""
    if img.shape[-2:] != (size, size):
        img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return img


def decode_raw(sample: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(uint8 (3,H,W) at the stored size, label) of one raw WebDataset sample."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None or "cls" not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"shard {url}, key {key}: needs an image (jpg/jpeg/png) and cls, has {have}")
    label = parse_label(sample["cls"], key, url)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 warns on every decode that its codecs move to TorchCodec; setup.py pins
            # torchvision <= 0.29.1, where they are the fastest libjpeg-turbo path at hand.
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        why = re.sub(r"^.*\.cpp:\d+, ", "", str(e).splitlines()[-1])  # drop torchvision's C++ source location
        raise CorruptImage.of(url, key, f"{len(data)}-byte image does not decode ({why})") from e
    return img, label


def _ignore_stop_signals(_worker_id: int) -> None:
    """A pre-emption signal reaches every process of a job (SLURM, a process-group kill): it is the
    trainer's to handle at a step boundary; a DataLoader worker that died of it would fail the run."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class CorruptImage(DataError):
    """An image that does not decode; skipped and counted with data.on_corrupt=skip."""

    # One-string constructor: DataLoader re-raises worker errors as ``type(e)(message)``.
    def __init__(self, message: str, shard: str = "", key: str = "", reason: str = ""):
        super().__init__(message)
        self.shard, self.key, self.reason = shard, key, reason

    @classmethod
    def of(cls, shard: str, key: str, reason: str) -> CorruptImage:
        return cls(f"undecodable image in shard {shard}, key {key}: {reason}; "
                   "set data.on_corrupt=skip to skip and count such samples", shard, key, reason)


def tar_samples(url: str, index: str | None = None, first: int = 0, end: int | None = None
                ) -> Iterator[dict[str, Any]]:
    """Raw samples [first, end) of one tar, in order; an unreadable tar names itself.

    With the shard's DALI index each member is one seek and one read (its header is checked against
    the index); parsing tar headers with Python's tarfile, as webdataset does, costs more CPU than
    decoding the JPEG. Without an index, webdataset's reader.
    """
    try:
        if index is not None:
            yield from _indexed_samples(url, index, first, end)
            return
        for n, sample in enumerate(tarfile_samples([{"url": url}])):
            if end is not None and n >= end:
                return
            if n >= first:
                yield sample
    except DataError:
        raise
    except Exception as e:  # tarfile.ReadError, OSError, ...: webdataset does not say which file
        raise DataError(f"shard {url}: unreadable tar ({type(e).__name__}: {e})") from e


def _indexed_samples(url: str, index: str, first: int, end: int | None) -> Iterator[dict[str, Any]]:
    lines = read_index(index)
    with open(url, "rb") as tar:
        for line in lines[first:end]:
            sample: dict[str, Any] = {"__url__": url}
            for member in parse_index_line(line):
                sample[member[0]] = read_member(tar, member, url, index)
            sample["__key__"] = line_key(line)
            yield sample


class _Batcher:
    """Collects decoded samples into batches; counts (or raises on) undecodable ones."""

    def __init__(self, batch: int, on_corrupt: str):
        self.batch, self.on_corrupt = batch, on_corrupt
        self.items: list[tuple[torch.Tensor, float, str]] = []
        self.skipped: list[tuple[str, str, str]] = []

    def add(self, sample: dict[str, Any], size: int, flip: bool) -> dict[str, Any] | None:
        try:
            img, label = decode_sample(sample, size, flip)
        except CorruptImage as e:
            if self.on_corrupt != "skip":
                raise
            self.skipped.append((e.shard, e.key, e.reason))
            return None
        self.items.append((img, label, sample["__key__"]))
        return self.flush() if len(self.items) == self.batch else None

    def flush(self) -> dict[str, Any] | None:
        if not self.items:
            return None
        imgs = [it[0] for it in self.items]
        x = torch.stack(imgs, out=_batch_buffer((len(imgs), *imgs[0].shape), torch.uint8))
        out = {"x": x,
               "label": torch.tensor([it[1] for it in self.items], dtype=torch.float32),
               "key": [it[2] for it in self.items], "skipped": self.skipped}
        self.items, self.skipped = [], []
        return out


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch; in a worker, in shared memory already, so handing it over copies nothing
    (what torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------
class TrainStream(IterableDataset):
    """One rank's training batches: node split, worker split, seeded shuffle buffer, endless."""

    def __init__(self, urls: list[tuple[str, str | None]], *, rank: int, world: int, epoch: int, seed: int,
                 batch: int, buffer: int,
                 skip: int, flip_p: float, size: int, on_corrupt: str):
        super().__init__()
        self.urls, self.rank, self.world, self.epoch, self.seed = urls, rank, world, epoch, seed
        self.batch, self.buffer, self.skip, self.flip_p, self.size = batch, buffer, skip, flip_p, size
        self.on_corrupt = on_corrupt

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        logical = (wid + self.skip) % nw  # so that the round-robin resumes at batch `skip`
        done = len(range(logical, self.skip, nw))  # batches of this logical worker before `skip`
        order = list(self.urls)
        random.Random(mix_seed(self.seed, self.epoch, 0x5A4D)).shuffle(order)  # same permutation on every rank
        mine = order[self.rank::self.world][logical::nw]
        if not mine:
            raise DataError(f"rank {self.rank} worker {logical}: no shard to read ({len(self.urls)} shards)")
        ids = (self.seed, self.epoch, self.rank, logical)
        order_rng, shuffle_rng = random.Random(mix_seed(*ids, 1)), random.Random(mix_seed(*ids, 2))
        flip_rng = random.Random(mix_seed(*ids, 3))
        samples = wds.shuffle(self.buffer, initial=self.buffer, rng=shuffle_rng)(self._endless(mine, order_rng))
        batcher = _Batcher(self.batch, self.on_corrupt)
        for i, sample in enumerate(samples):
            flip = flip_rng.random() < self.flip_p  # drawn for skipped samples too: resume stays exact
            if i < done * self.batch:
                continue
            out = batcher.add(sample, self.size, flip)
            if out is not None:
                yield out

    @staticmethod
    def _endless(urls: list[tuple[str, str | None]], rng: random.Random) -> Iterator[dict[str, Any]]:
        while True:
            order = list(urls)
            rng.shuffle(order)
            for url, index in order:
                yield from tar_samples(url, index)


class EvalStream(IterableDataset):
    """One rank's evaluation samples, in order: worker w reads the w-th contiguous part of the range."""

    def __init__(self, shards: ShardSet, indexes: list[str | None], parts: list[tuple[int, int]], *, batch: int,
                 size: int, on_corrupt: str):
        super().__init__()
        self.shards, self.indexes, self.parts = shards, indexes, parts
        self.batch, self.size, self.on_corrupt = batch, size, on_corrupt

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        batcher = _Batcher(self.batch, self.on_corrupt)
        for part in self.parts[wid::nw]:
            for i, first, end in self.shards.pieces(*part):
                url, n = str(self.shards.tars[i]), first
                for sample in tar_samples(url, self.indexes[i], first, end):
                    n += 1
                    out = batcher.add(sample, self.size, False)
                    if out is not None:
                        yield out
                if n < end:
                    raise DataError(f"shard {url}: holds {n} samples, manifest.json says {self.shards.counts[i]}")
        out = batcher.flush()
        if out is not None:
            yield out


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------
class TorchLoader(Loader):
    """DataLoader over TrainStream / EvalStream; batches assembled in the workers."""

    backend = "torch"

    def __init__(self, cfg: Any, shards: ShardSet, **kw: Any):
        super().__init__(cfg, shards, **kw)
        self.num_workers = cfg.data.num_workers
        self.pin = bool(cfg.data.pin_memory and self.device.type == "cuda")
        # DALI index files that match the manifest make reading cheap (see tar_samples); optional here
        self.indexes = [str(i) if i.is_file() and index_count(i) == c else None
                        for i, c in zip(shards.indexes, shards.counts)]

    def describe(self) -> str:
        indexed = sum(i is not None for i in self.indexes)
        return (f"{self.num_workers} workers, prefetch {self.cfg.data.prefetch}, pinned={self.pin}, "
                f"{indexed}/{len(self.indexes)} shards read through their index")

    def _eval_parts(self) -> list[tuple[int, int]]:
        lo, hi = self.shards.rank_range(self.rank, self.world_size)
        n = max(1, min(self.cfg.data.num_workers, hi - lo))
        return [(lo + (hi - lo) * w // n, lo + (hi - lo) * (w + 1) // n) for w in range(n)]

    def _eval_steps(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in self._eval_parts())

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        d = self.cfg.data
        if self.train:
            urls = [(str(t), i) for t, i in zip(self.shards.tars, self.indexes)]
            if self.balance is not None:  # data.balance: this epoch's selection, read through its index files
                sel = self.selected_shards(epoch)
                urls = [(str(t), str(i)) for t, i in zip(sel.tars, sel.indexes)]
            ds: IterableDataset = TrainStream(
                urls, rank=self.rank,
                world=self.world_size, epoch=epoch, seed=self.seed, batch=self.batch_size, buffer=d.shuffle_buffer,
                skip=skip, flip_p=d.flip_p, size=self.size, on_corrupt=d.on_corrupt)
            workers = d.num_workers
        else:
            parts = self._eval_parts()
            ds = EvalStream(self.shards, self.indexes, parts, batch=self.batch_size, size=self.size,
                            on_corrupt=d.on_corrupt)
            workers = len(parts) if d.num_workers else 0
        # Our own generator for the DataLoader's base seed: by default it draws it from the global torch
        # RNG when the iterator starts, which shifted every later dropout draw of a resumed run.
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, 0xD1))
        dl = DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=self.pin,
                        prefetch_factor=d.prefetch if workers else None, generator=g,
                        worker_init_fn=_ignore_stop_signals if workers else None)
        with contextlib.closing(worker_batches(dl)) as batches:
            for batch in batches:
                for shard, key, reason in batch.pop("skipped"):
                    self._record_skip(key, shard, reason)
                yield batch


def worker_batches(dl: DataLoader) -> Iterator[Any]:
    """``dl``'s batches, a worker's DataError re-raised as its own one-line message, and the workers
    stopped as soon as the caller stops (an endless training stream would otherwise keep them)."""
    it = iter(dl)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as e:
                raise _unwrap(e) from None
            yield batch
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _unwrap(e: DataError) -> DataError:
    """A worker's error without DataLoader's "Caught ... Original Traceback" wrapper (our messages are one line)."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = text.strip().splitlines()[-1]  # "fdtrain.data.loading.torch_loader.CorruptImage: undecodable image in ..."
    return type(e)(last.split(": ", 1)[1] if ": " in last else last)
