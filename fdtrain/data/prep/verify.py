"""`fdtrain shards verify DIR`: re-read every sample of one split folder or of a dataset folder.

Checks, per shard: the file's sha256 against the manifest, the DALI index against one recomputed
from the tar, that the tar reads to its end, and per sample: image + cls + json present, the
image's sha256 (stored in its json) and that it decodes, cls is "0"/"1" and equals json label,
json key equals the tar key, the key begins with the json's video key, the json has every field.
Per split: sample counts, label and method counts against the manifest, keys unique.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fdtrain.data import format as sh


@dataclass
class ShardReport:
    name: str
    num_samples: int = 0
    labels: Counter = field(default_factory=Counter)
    methods: Counter = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _decode(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return None
    except Exception as e:  # PIL raises several types for damaged data
        return f"{type(e).__name__}: {e}"


def verify_shard(split_dir: str, entry: dict, decode: bool = True) -> ShardReport:
    split_dir = Path(split_dir)
    name = entry.get("name", "?")
    rep = ShardReport(name)
    tar_path = split_dir / name
    if not tar_path.is_file():
        rep.problems.append(f"{name}: missing")
        return rep
    if "sha256" in entry and sh.sha256_file(tar_path) != entry["sha256"]:
        rep.problems.append(f"{name}: sha256 differs from the manifest (file changed or damaged)")
    idx_path = sh.index_path(tar_path)
    try:
        for key, parts in sh.iter_tar_samples(tar_path):
            rep.num_samples += 1
            rep.keys.append(key)
            for p in _check_sample(key, parts, decode):
                rep.problems.append(f"{name}: {key}: {p}")
            try:
                meta = json.loads(parts.get("json", b"{}"))
                rep.labels[str(meta.get("label"))] += 1
                rep.methods[str(meta.get("method", ""))] += 1
            except ValueError:
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        rep.problems.append(f"{name}: unreadable tar after {rep.num_samples} samples ({type(e).__name__}: {e})")
        return rep
    if rep.num_samples != entry.get("num_samples"):
        rep.problems.append(f"{name}: {rep.num_samples} samples, manifest says {entry.get('num_samples')}")
    if not idx_path.is_file():
        rep.problems.append(f"{idx_path.name}: DALI index missing")
    else:
        try:
            ok = idx_path.read_text() == sh.index_text(sh.tar_index_lines(tar_path))
        except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
            ok, rep.problems = False, rep.problems + [f"{idx_path.name}: {type(e).__name__}: {e}"]
        if not ok:
            rep.problems.append(f"{idx_path.name}: does not match the tar's members and offsets")
    return rep


def _check_sample(key: str, parts: dict[str, bytes], decode: bool) -> list[str]:
    out = []
    exts = [e for e in sh.IMAGE_EXTS if e in parts]
    if len(exts) != 1:
        out.append(f"want one image member ({'/'.join(sh.IMAGE_EXTS)}), got {sorted(parts)}")
    for ext in ("cls", "json"):
        if ext not in parts:
            out.append(f"{ext} member missing")
    label = None  # the loaders' reading of cls
    if "cls" in parts:
        try:
            label = int(sh.parse_label(parts["cls"], key, "?"))
        except sh.DataError:
            out.append(f"cls is {parts['cls'].strip()[:20]!r}, want 0 or 1")
    meta = None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError as e:
            out.append(f"json does not parse: {e}")
    if isinstance(meta, dict):
        missing = [f for f in sh.SAMPLE_FIELDS if f not in meta]
        if missing:
            out.append(f"json lacks {', '.join(missing)}")
        if meta.get("key") != key:
            out.append(f"json key {meta.get('key')!r} differs from the tar key")
        if label is not None and meta.get("label") != label:
            out.append(f"json label {meta.get('label')!r} differs from cls {label}")
        video = meta.get("video")
        if not (isinstance(video, str) and key.startswith(video + "/")):
            out.append(f"key does not begin with its video key {video!r}")
        if exts and "image_sha256" in meta and hashlib.sha256(parts[exts[0]]).hexdigest() != meta["image_sha256"]:
            out.append("image bytes differ from their recorded sha256 (damaged)")
    elif meta is not None:
        out.append("json is not an object")
    if exts and decode:
        err = _decode(parts[exts[0]])
        if err:
            out.append(f"image does not decode: {err}")
    return out


def verify_split(split_dir: Path, workers: int = 1, decode: bool = True) -> tuple[list[str], dict]:
    """(problems, summary) for one split folder."""
    problems: list[str] = []
    try:
        m = sh.read_manifest(split_dir)
    except sh.DataError as e:
        return [str(e)], {}
    for f in ("split", "num_samples", "num_shards", "shards", "counts"):
        if f not in m:
            problems.append(f"manifest.json lacks '{f}'")
    entries = m.get("shards", [])
    if len(entries) != m.get("num_shards"):
        problems.append(f"manifest lists {len(entries)} shards but says num_shards={m.get('num_shards')}")
    listed = {e.get("name") for e in entries}
    for extra in sorted(p.name for p in split_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: a tar the manifest does not list")
    args = [(str(split_dir), e, decode) for e in entries]
    if workers > 1 and len(args) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(args))) as pool:
            reports = pool.starmap(verify_shard, args)
    else:
        reports = [verify_shard(*a) for a in args]
    labels, methods, total, seen, dup = Counter(), Counter(), 0, set(), []
    for r in reports:
        problems += r.problems
        labels.update(r.labels)
        methods.update(r.methods)
        total += r.num_samples
        for k in r.keys:
            if k in seen:
                dup.append(k)
            seen.add(k)
    if dup:
        problems.append(f"{len(dup)} duplicate keys, e.g. {dup[0]}")
    if total != m.get("num_samples"):
        problems.append(f"{total} samples read, manifest says {m.get('num_samples')}")
    want = m.get("counts", {})
    if {k: v for k, v in want.get("label", {}).items() if v} != {k: v for k, v in labels.items() if v}:
        problems.append(f"label counts {dict(labels)} differ from the manifest's {want.get('label')}")
    if want.get("method") is not None and dict(want["method"]) != dict(methods):
        problems.append(f"method counts {dict(methods)} differ from the manifest's {want['method']}")
    summary = {"split": split_dir.name, "num_samples": total, "num_shards": len(entries),
               "label": dict(sorted(labels.items())), "method": dict(sorted(methods.items()))}
    return problems, summary


def verify(root: str | Path, workers: int = 1, decode: bool = True, max_report: int = 50) -> int:
    """Verify every split folder under ``root``; prints a report, returns 0 (intact) or 1 (damage)."""
    root = Path(root)
    if not root.is_dir():
        print(f"shards verify: {root}: not a folder")
        return 1
    dirs = sh.find_split_dirs(root)
    if not dirs:
        print(f"shards verify: {root}: no manifest.json in it or in its sub-folders")
        return 1
    bad = 0
    for d in dirs:
        problems, s = verify_split(d, workers=workers, decode=decode)
        if problems:
            bad += 1
            print(f"{d}: DAMAGED, {len(problems)} problem(s)")
            for p in problems[:max_report]:
                print(f"  - {p}")
            if len(problems) > max_report:
                print(f"  ... and {len(problems) - max_report} more")
        else:
            print(f"{d}: ok, {s['num_samples']} samples in {s['num_shards']} shards, labels {s['label']}, "
                  f"methods {s['method']}")
    print(f"shards verify: {len(dirs) - bad} of {len(dirs)} split folders intact")
    return 1 if bad else 0
