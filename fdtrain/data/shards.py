"""WebDataset shard writing and reading (the "Shard format" of design/system.md).

A split folder holds ``shard-000000.tar`` + ``shard-000000.idx`` ... and ``manifest.json``.
Each sample is three tar members, ``<key>.jpg`` (or ``.png``), ``<key>.cls`` (ASCII "0"/"1") and
``<key>.json``, written back to back so that DALI and webdataset group them into one sample.

The index file is DALI's (``wds2idx``, format v1.2): a header ``v1.2 <num samples>`` then one
line per sample with ``<ext> <data offset> <size> <member name>`` for each member. We write it
while writing the tar (we know the offsets), which is byte-identical to what ``wds2idx`` makes
(a test checks both that and that DALI reads it back) without needing DALI or GNU tar here.

Tars are written byte-deterministically (fixed mtime/owner/mode), so the same samples in the
same order give the same bytes: a resumed ingestion equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_VERSION = "v1.2"
IMAGE_EXTS = ("jpg", "png")
# The per-sample json fields the loaders and metrics may rely on.
SAMPLE_FIELDS = ("key", "dataset", "split", "method", "compression", "video", "frame", "label", "source")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


def clean_component(text: str, max_len: int = 64) -> str:
    """One key component: no dots (they separate key from extension), slashes or spaces.

    Long names are cut and suffixed with a hash of the original, so keys stay unique and member
    names stay within the 255 characters of a USTAR header.
    """
    out = _BAD_KEY_CHARS.sub("_", str(text)).strip("_")
    if not out:
        raise ValueError(f"key component {text!r} is empty once cleaned")
    if len(out) > max_len:
        out = out[: max_len - 9] + "_" + hashlib.sha1(str(text).encode()).hexdigest()[:8]
    return out


def frame_key(video_key: str, frame: int) -> str:
    """Sample key = video key + "/" + the frame index on at least 4 digits."""
    return f"{video_key}/{int(frame):04d}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Sample:
    """One face crop ready to be written: image bytes plus its metadata."""

    key: str
    image: bytes
    ext: str  # "jpg" or "png"
    label: int
    meta: dict  # the sample json (SAMPLE_FIELDS and any extras)

    def members(self) -> list[tuple[str, bytes]]:
        meta = dict(self.meta)
        meta.setdefault("key", self.key)
        meta.setdefault("label", self.label)
        meta["image_sha256"] = hashlib.sha256(self.image).hexdigest()  # lets verify name a damaged sample
        body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        return [(self.ext, self.image), ("cls", str(int(self.label)).encode()), ("json", body)]


class ShardTarWriter:
    """Writes one tar shard and its DALI index side by side."""

    def __init__(self, tar_path: str | os.PathLike):
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._tmp = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        # USTAR: names up to 255 chars via the prefix field and no extra header entries. GNU
        # ././@LongLink and PAX headers are extra members that wds2idx mis-indexes.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index: list[str] = []
        self.num_samples = 0

    def write(self, sample: Sample) -> None:
        if "." in sample.key:
            raise ValueError(f"sample key {sample.key!r} contains a dot; DALI would split it there")
        parts = []
        for ext, data in sample.members():
            name = f"{sample.key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            try:
                self._tar.addfile(info, io.BytesIO(data))
            except ValueError as e:
                raise ValueError(f"{self.tar_path}: member name {name!r} does not fit a tar header: {e}") from e
            # the data ends where the padded blocks end; it starts len(data) rounded up before that
            end = self._file.tell()
            offset = end - int(math.ceil(len(data) / tarfile.BLOCKSIZE)) * tarfile.BLOCKSIZE
            parts.append(f"{ext} {offset} {len(data)} {name}")
        self._index.append(" ".join(parts))
        self.num_samples += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.tar_path)
        index = f"{INDEX_VERSION} {len(self._index)}\n" + "".join(line + "\n" for line in self._index)
        atomic_write_text(self.idx_path, index)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def index_text_for(tar_path: str | os.PathLike) -> str:
    """The DALI index a tar should have, recomputed from its members (for verify)."""
    lines: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name
            dot = name.find(".", name.rfind("/") + 1)
            base, ext = name[:dot], name[dot + 1:]
            entry = f"{ext} {m.offset_data} {m.size} {name}"
            if base != last:
                lines.append([entry])
                last = base
            else:
                lines[-1].append(entry)
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(" ".join(x) + "\n" for x in lines)


def iter_tar_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each run of consecutive members sharing a key. Raises on damage."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            dot = m.name.find(".", m.name.rfind("/") + 1)
            key, ext = m.name[:dot], m.name[dot + 1:]
            f = tar.extractfile(m)
            data = f.read() if f is not None else b""
            if len(data) != m.size:
                raise tarfile.ReadError(f"{tar_path}: member {m.name} truncated ({len(data)} of {m.size} bytes)")
            if key != current:
                if current is not None:
                    yield current, parts
                current, parts = key, {}
            parts[ext] = data
    if current is not None:
        yield current, parts


def plan_shards(num_samples: int, total_bytes: int, shard_bytes: int, min_shards: int) -> list[int]:
    """Sample counts per shard: enough shards for the size target and the minimum, balanced counts."""
    if num_samples == 0:
        return []
    n = max(1, math.ceil(total_bytes / max(1, shard_bytes)), min_shards)
    n = min(n, num_samples)
    base, extra = divmod(num_samples, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def write_split(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    counts_per_shard: list[int],
    manifest_extra: dict,
) -> dict:
    """Write the samples (already in their final, shuffled order) into shards + manifest.json.

    ``counts_per_shard`` comes from :func:`plan_shards`. The folder is written under a temporary
    name and renamed at the end, so a killed run never leaves a half-written split behind.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    if tmp_dir.exists():
        _rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    it = iter(samples)
    shards, labels, methods, videos, keys = [], Counter(), Counter(), set(), set()
    for i, n in enumerate(counts_per_shard):
        name = SHARD_PATTERN.format(i)
        w = ShardTarWriter(tmp_dir / name)
        try:
            for _ in range(n):
                s = next(it)
                if s.key in keys:
                    raise ValueError(f"duplicate sample key {s.key!r}")
                keys.add(s.key)
                w.write(s)
                labels[str(s.label)] += 1
                methods[s.meta.get("method", "")] += 1
                videos.add(s.meta.get("video", ""))
        except BaseException:
            w.abort()
            raise
        w.close()
        shards.append({
            "name": name,
            "index": Path(name).with_suffix(".idx").name,
            "num_samples": n,
            "bytes": (tmp_dir / name).stat().st_size,
            "sha256": sha256_file(tmp_dir / name),
            "index_sha256": sha256_file((tmp_dir / name).with_suffix(".idx")),
        })
    if next(it, None) is not None:
        raise ValueError(f"{out_dir}: more samples than the shard plan holds ({sum(counts_per_shard)})")
    manifest = {
        "split": out_dir.name,
        "num_samples": sum(counts_per_shard),
        "num_shards": len(shards),
        "num_videos": len(videos),
        "shards": shards,
        "counts": {"label": {k: labels.get(k, 0) for k in ("0", "1")}, "method": dict(sorted(methods.items()))},
        **manifest_extra,
    }
    atomic_write_text(tmp_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    if out_dir.exists():
        _rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return manifest


def read_manifest(split_dir: str | os.PathLike) -> dict:
    path = Path(split_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest.json; is {split_dir} a shard folder?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def find_split_dirs(root: str | os.PathLike) -> list[Path]:
    """``root`` itself when it is a split folder, else its sub-folders that hold a manifest."""
    root = Path(root)
    if (root / "manifest.json").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").is_file())


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
