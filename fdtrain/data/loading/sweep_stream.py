"""The robustness sweep's samples: where they are, which rank takes which, and the workers' stream.

Each rank takes the eval loader's sample range (``ShardSet.rank_range``) for the image distortions,
and for video compression the videos whose first frame (in shard order) lies in that range, so
every (sample, condition) is scored exactly once across ranks and a video's clip holds all of its
frames whatever the split. Workers take contiguous parts of the range (and every n-th video).
A worker decodes a chunk of samples once and emits one batch per image condition; on the CPU it
also distorts and resizes them, and with ``on_device`` it ships the decoded images once for the
main process to distort on its device (the same torch functions). Video compression (PyAV) always
runs in the workers, decoding each video once for all its CRF levels.
"""
from __future__ import annotations

import logging
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from fdtrain.data.distortions import condition_seed, distort_image, parameter, video_compression
from fdtrain.data.format import (
    IMAGE_EXTS,
    DataError,
    Member,
    ShardSet,
    index_count,
    line_key,
    parse_index_line,
    read_index,
    read_member,
    split_member,
)
from fdtrain.data.loading.torch_loader import CorruptImage, decode_raw, resize_square
from fdtrain.metrics import video_key

log = logging.getLogger("fdtrain.data")
_WANTED = (*IMAGE_EXTS, "cls")


@dataclass
class Entry:
    url: str
    key: str
    members: list[Member]  # image and cls


def catalog(shards: ShardSet) -> list[Entry]:
    """Every sample of a split in shard order (the order ``rank_range`` splits), through the DALI
    index where it matches the manifest, else by scanning the tar's headers."""
    out: list[Entry] = []
    for tar, idx, count in zip(shards.tars, shards.indexes, shards.counts):
        url = str(tar)
        if Path(idx).is_file() and index_count(Path(idx)) == count:
            rows = [Entry(url, line_key(line), [m for m in parse_index_line(line) if m[0] in _WANTED])
                    for line in read_index(idx)]
        else:
            rows = _scan_tar(url)
        if len(rows) != count:
            raise DataError(f"shard {url}: holds {len(rows)} samples, manifest.json says {count}")
        out += rows
    return out


def _scan_tar(url: str) -> list[Entry]:
    by_key: OrderedDict[str, Entry] = OrderedDict()
    try:
        with tarfile.open(url) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_member(m.name)
                ext = ext.lower()
                entry = by_key.setdefault(key, Entry(url, key, []))
                if ext in _WANTED:
                    entry.members.append((ext, m.offset_data, m.size, m.name))
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"shard {url}: unreadable tar ({type(e).__name__}: {e})") from e
    return list(by_key.values())


def read_entry(entry: Entry, files: dict[str, Any]) -> dict[str, Any]:
    """The raw sample (what ``decode_raw`` takes) of an entry; ``files`` caches open tar handles."""
    fh = files.get(entry.url)
    if fh is None:
        fh = files[entry.url] = open(entry.url, "rb")
    sample: dict[str, Any] = {"__url__": entry.url, "__key__": entry.key}
    for member in entry.members:
        sample[member[0]] = read_member(fh, member, entry.url, "its index")
    return sample


def plan(entries: list[Entry], lo: int, hi: int) -> tuple[list[int], list[list[int]]]:
    """(this rank's sample indices, this rank's videos as sample indices in frame order)."""
    videos: OrderedDict[str, list[int]] = OrderedDict()
    for i, e in enumerate(entries):
        videos.setdefault(video_key(e.key), []).append(i)
    mine = [sorted(v, key=lambda i: entries[i].key) for v in videos.values() if lo <= v[0] < hi]
    return list(range(lo, hi)), mine


class SweepStream(IterableDataset):
    """Batches of every condition for one rank.

    Messages: {"x": uint8 (B,3,S,S) distorted and resized, "cond": i, "label", "key"} or, with
    ``on_device``, {"raw": [uint8 (3,H,W)] as decoded, "conds": [i, ...], "label", "key"}.
    """

    def __init__(self, entries: dict[int, Entry], image_parts: list[list[int]], video_parts: list[list[list[int]]],
                 conds: list[tuple[str, int]], *, size: int, seed: int, batch: int, on_device: bool,
                 on_corrupt: str):
        super().__init__()
        self.entries, self.image_parts, self.video_parts = entries, image_parts, video_parts
        self.conds, self.size, self.seed, self.batch = conds, size, seed, batch
        self.on_device, self.on_corrupt = on_device, on_corrupt

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        files: dict[str, Any] = {}
        try:
            for part in self.image_parts[wid::nw]:
                yield from self._image_conditions(part, files)
            for part in self.video_parts[wid::nw]:
                yield from self._video_compression(part, files)
        finally:
            for fh in files.values():
                fh.close()

    def _decode(self, indices: list[int], files: dict[str, Any]) -> tuple[list[torch.Tensor], list[float], list[str]]:
        imgs, labels, keys = [], [], []
        for i in indices:
            try:
                img, label = decode_raw(read_entry(self.entries[i], files))
            except CorruptImage as e:
                if self.on_corrupt != "skip":
                    raise
                log.warning("robustness: skipped undecodable sample %s (%s)", e.key, e.reason)
                continue
            imgs.append(img)
            labels.append(label)
            keys.append(self.entries[i].key)
        return imgs, labels, keys

    def _image_conditions(self, part: list[int], files: dict[str, Any]) -> Iterator[dict[str, Any]]:
        image_conds = [c for c, (t, _) in enumerate(self.conds) if t != "VC"]
        if not image_conds:
            return
        for start in range(0, len(part), self.batch):
            imgs, labels, keys = self._decode(part[start:start + self.batch], files)
            if not imgs:
                continue
            label = torch.tensor(labels, dtype=torch.float32)
            if self.on_device:
                yield {"raw": imgs, "conds": image_conds, "label": label, "key": keys}
                continue
            for c in image_conds:
                yield {"x": distort_batch(imgs, keys, self.conds[c], self.seed, self.size), "cond": c,
                       "label": label, "key": keys}

    def _video_compression(self, videos: list[list[int]], files: dict[str, Any]) -> Iterator[dict[str, Any]]:
        vc = [c for c, (t, _) in enumerate(self.conds) if t == "VC"]
        pending: dict[int, list] = {c: [] for c in vc}
        for frames in videos:
            imgs, labels, keys = self._decode(frames, files)
            if not imgs:
                continue
            for c in vc:
                out = video_compression(imgs, parameter("VC", self.conds[c][1]))
                pending[c] += [(resize_square(o, self.size), y, k) for o, y, k in zip(out, labels, keys)]
                while len(pending[c]) >= self.batch:
                    items, pending[c] = pending[c][: self.batch], pending[c][self.batch:]
                    yield _batch(items, c)
        for c in vc:
            if pending[c]:
                yield _batch(pending[c], c)


def distort_batch(imgs: list[torch.Tensor], keys: list[str], cond: tuple[str, int], seed: int, size: int
                  ) -> torch.Tensor:
    """uint8 (B,3,S,S): each decoded image distorted (seeded by its key) then resized like the loaders."""
    t, lv = cond
    return torch.stack([resize_square(distort_image(im, t, lv, condition_seed(seed, k, t, lv)), size)
                        for im, k in zip(imgs, keys)])


def _batch(items: list, cond: int) -> dict[str, Any]:
    return {"x": torch.stack([it[0] for it in items]), "cond": cond,
            "label": torch.tensor([it[1] for it in items], dtype=torch.float32), "key": [it[2] for it in items]}
