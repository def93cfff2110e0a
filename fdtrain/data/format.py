"""The shard format (design/system.md "Shard format"): its one owner, writer and reader side.

A split folder holds ``shard-000000.tar`` + ``shard-000000.idx`` ... and ``manifest.json``.
Each sample is three tar members, ``<key>.jpg`` (or ``.png``), ``<key>.cls`` (ASCII "0"/"1") and
``<key>.json``, written back to back so that DALI and webdataset group them into one sample; a
member's key is the text before the first dot of its last path part (``sample_key``).

The index file is DALI's (``wds2idx``, format v1.2): a header ``v1.2 <num samples>`` then one
line per sample with ``<ext> <data offset> <size> <member name>`` for each member. The writer
makes it while writing the tar (it knows the offsets); ``tar_index_lines`` makes the same lines
from a finished tar (for verify, and for a tar that has no index), byte-identical to what
``wds2idx`` makes (a test checks both that and that DALI reads it back) without DALI or GNU tar.

Tars are written byte-deterministically (fixed mtime/owner/mode), so the same samples in the
same order give the same bytes: a resumed ingestion equals an uninterrupted one.

The reading side (``open_shards``) checks a split before anything runs: manifest, sizes, index
files, and returns a ``ShardSet`` that both loaders, the balance selection and the robustness
sweep read. No torch here.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fdtrain.data")

SHARD_PATTERN = "shard-{:06d}.tar"
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"
# Image member extensions a shard sample may hold (both loaders and verify accept each);
# `fdtrain shards make --format` writes jpg or png.
IMAGE_EXTS = ("jpg", "jpeg", "png")
# Image *files* of a dataset (or given to `fdtrain predict`): anything PIL decodes. A second
# constant on purpose: these are inputs, decoded and re-encoded as jpg/png before they reach a shard.
SOURCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The per-sample json fields the loaders and metrics may rely on.
SAMPLE_FIELDS = ("key", "dataset", "split", "method", "compression", "video", "frame", "label", "source")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


class DataError(RuntimeError):
    """Data that cannot be loaded: the message names the split, folder, shard and/or sample key."""


# --------------------------------------------------------------------------------------------
# Keys and labels
# --------------------------------------------------------------------------------------------
def sample_key(name: str) -> str:
    """WebDataset key of a member name: everything before the first dot of the last path part."""
    dot = name.find(".", name.rfind("/") + 1)
    return name if dot < 0 else name[:dot]


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member name; the extension is "" when the last path part has no dot."""
    key = sample_key(name)
    return key, name[len(key) + 1:]


def parse_label(raw: bytes, key: str, shard: str) -> float:
    """The ``cls`` component: ASCII "0" (real) or "1" (fake)."""
    text = raw.rstrip(b"\0").strip()
    if text not in (b"0", b"1"):
        raise DataError(f"shard {shard}, key {key}: cls must be '0' or '1', got {text[:20]!r}")
    return float(text == b"1")


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
        self.idx_path = index_path(self.tar_path)
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
            parts.append((ext, offset, len(data), name))
        self._index.append(index_line(parts))
        self.num_samples += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.tar_path)
        write_index(self.idx_path, self._index)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# DALI index files
# --------------------------------------------------------------------------------------------
Member = tuple[str, int, int, str]  # (ext, data offset, size, member name)


def index_path(tar: str | os.PathLike) -> Path:
    """Where a shard's index lives: beside it, ``shard-000000.tar`` -> ``shard-000000.idx``."""
    return Path(tar).with_suffix(".idx")


def index_line(members: Iterable[Member]) -> str:
    """One sample's index line: ``<ext> <data offset> <size> <member name>`` per member."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def parse_index_line(line: str) -> list[Member]:
    """The members of one index line, in order (lower-case extensions)."""
    parts = line.split()
    return [(parts[j].lower(), int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]) for j in range(0, len(parts) - 3, 4)]


def line_key(line: str) -> str:
    """The sample key of an index line (from its first member's name)."""
    parts = line.split(maxsplit=4)
    return sample_key(parts[3]) if len(parts) > 3 else "?"


def index_text(lines: list[str]) -> str:
    """A whole index file: the ``v1.2 N`` header and one line per sample."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def write_index(path: str | os.PathLike, lines: list[str]) -> None:
    """Write an index file (atomically: a reader never sees half of one)."""
    atomic_write_text(path, index_text(lines))


def read_index(path: str | os.PathLike) -> list[str]:
    """The sample lines of an index file (its header checked and dropped)."""
    with open(path) as fh:
        head = fh.readline().split()
        lines = fh.read().splitlines()
    if len(head) != 2 or not head[1].isdigit():
        raise DataError(f"{path}: not a DALI webdataset index (header {' '.join(head)!r})")
    return lines


def index_count(idx: str | os.PathLike) -> int:
    """Number of samples a DALI webdataset index (``v1.2 N`` header) lists."""
    with open(idx) as fh:
        head = fh.readline().split()
    if len(head) != 2 or not head[1].isdigit():
        raise DataError(f"{idx}: not a DALI webdataset index (header {' '.join(head)!r})")
    return int(head[1])


def read_member(fh: Any, member: Member, url: str, index: str) -> bytes:
    """The data of one indexed member of an open tar; its header must name it (else a stale index)."""
    _ext, offset, size, name = member
    fh.seek(offset - tarfile.BLOCKSIZE)
    block = fh.read(tarfile.BLOCKSIZE + size)  # the member's header, then its data
    if len(block) != tarfile.BLOCKSIZE + size or not name.encode().endswith(block[:100].rstrip(b"\0")):
        raise DataError(f"shard {url}: member {name} is not where {index} says (stale index: "
                        "delete it, or rebuild the shard)")
    return block[tarfile.BLOCKSIZE:]


def tar_index_lines(tar_path: str | os.PathLike) -> list[str]:
    """The index lines a tar should have, from its members: consecutive members sharing a key make
    one sample. Members without a key (a dot file) are left out, as ``wds2idx`` does, and so are
    members without an extension (``wds2idx`` would list "README" as component "README" of sample
    "READM", which no reader can use); otherwise the lines are the ones ``wds2idx`` writes."""
    lines: list[list[Member]] = []
    last = None
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_member(m.name)
            if not key or key.endswith("/") or not ext:
                continue
            if key != last:
                lines.append([])
                last = key
            lines[-1].append((ext, m.offset_data, m.size, m.name))
    return [index_line(x) for x in lines]


def build_index(tar: Path, idx: Path) -> None:
    """Write the index of a tar that has none (the same lines the shard writer would have written)."""
    try:
        lines = tar_index_lines(tar)
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{tar}: cannot index (unreadable tar: {type(e).__name__}: {e})") from e
    if not lines:
        raise DataError(f"{tar}: cannot index (no samples in it)")
    idx.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=idx.parent, prefix=f".{idx.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(index_text(lines))
        os.replace(tmp, idx)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


# --------------------------------------------------------------------------------------------
# Reading tars without an index
# --------------------------------------------------------------------------------------------
def iter_tar_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each run of consecutive members sharing a key. Raises on damage."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_member(m.name)
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
            "index": index_path(name).name,
            "num_samples": n,
            "bytes": (tmp_dir / name).stat().st_size,
            "sha256": sha256_file(tmp_dir / name),
            "index_sha256": sha256_file(index_path(tmp_dir / name)),
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
    atomic_write_text(tmp_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    if out_dir.exists():
        _rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return manifest


def read_manifest(split_dir: str | os.PathLike, where: str | None = None) -> dict:
    """The ``manifest.json`` of a split folder; DataError naming the folder (``where``: the config
    field it came from) when there is none, and the file when it is not JSON."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{where or split_dir}: no {MANIFEST} in this folder (write shards with `fdtrain shards make`)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest, not valid JSON ({e})") from e


def find_split_dirs(root: str | os.PathLike) -> list[Path]:
    """``root`` itself when it is a split folder, else its sub-folders that hold a manifest."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# Reading: the shards of one split, checked
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
        manifest_path = root / MANIFEST
        manifest = read_manifest(root, where=where)
        try:
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
        index_names = [e.get("index") or index_path(n).name for e, n in zip(entries, names)]
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
        index_names = [index_path(t).name for t in tars]
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
