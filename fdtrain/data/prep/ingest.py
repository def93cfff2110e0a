"""Ingestion: jobs -> face crops (worker processes) -> shuffled shards per output split.

Two stages, so that a killed run resumes and a SLURM array can share the work:

1. **process**: each job (a video, a frame folder, an archive) is decoded, its faces cropped and
   encoded, and written to ``<work>/<record id>.bin`` (the image bytes back to back) and then
   ``<record id>.json`` (what the bytes are, what was skipped and why). The json is renamed into
   place last: it is the completion mark, and jobs with one are not redone. The record id hashes
   the job and the crop options, so changing an option never reuses stale crops.
2. **assemble**: every record of the needed jobs is read, the samples of each output split are
   sorted by key, shuffled with a seed and written into shards (``format.write_split``).
   Nothing here depends on the order the jobs finished in, so a rerun after a kill gives the same
   bytes as an uninterrupted run.

Failures (undecodable video, no face, unreadable archive or image) never stop the run: they are
recorded with their reason, listed in each split's manifest and summarized at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from fdtrain.data import format as sh
from fdtrain.data.format import SOURCE_IMAGE_SUFFIXES
from fdtrain.data.prep.sources import ArchiveJob, Job, OutputSplit, Plan, VideoJob
from fdtrain.data.prep.video import (
    FRAMES_PER_VIDEO,
    frame_numbers,
    natural_key,
    read_video_frames,
    uniform_indices,
)

# Test hook: the parent SIGKILLs itself after this many finished jobs (the resume test's "kill midway").
KILL_AFTER_ENV = "FDTRAIN_INGEST_KILL_AFTER"
SAMPLE_OVERHEAD = 3 * 512 + 1024  # tar headers + padding + cls/json members, for sizing shards


@dataclass(frozen=True)
class CropOptions:
    """How frames become stored samples (everything that changes the bytes of a crop)."""

    frames: int | None = FRAMES_PER_VIDEO  # frames per video, spread uniformly; None = all
    margin: float = 1.3  # square box side = margin x the detected box's longer side
    size: int | None = None  # short side of stored crops; None = 320 for detected faces, native for crops
    fmt: str = "jpg"
    quality: int = 95
    detector: str = "dlib"

    def record_id(self, job: Job) -> str:
        opts = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(f"{job.id}|{opts}".encode()).hexdigest()[:24]


DEFAULT_DETECTED_SIZE = 320

# ---------------------------------------------------------------------------------------------
# Stage 1: one job -> one record (runs in worker processes)
# ---------------------------------------------------------------------------------------------
_DETECTORS: dict[str, object] = {}


def _detector(spec: str):
    if spec not in _DETECTORS:  # one per process: dlib's detector is not picklable
        from fdtrain.data.prep.faces import make_detector

        _DETECTORS[spec] = make_detector(spec)
    return _DETECTORS[spec]


class _RecordWriter:
    def __init__(self, work: Path, rid: str):
        self.bin_path, self.json_path = work / f"{rid}.bin", work / f"{rid}.json"
        self._tmp_bin = work / f"{rid}.bin.tmp"
        self._f = open(self._tmp_bin, "wb")
        self.videos: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, data: bytes) -> tuple[int, int]:
        off = self._f.tell()
        self._f.write(data)
        return off, len(data)

    def finish(self, job: Job, rid: str) -> dict:
        self._f.close()
        os.replace(self._tmp_bin, self.bin_path)
        record = {"record": rid, "job": job.id, "source": job.source, "videos": self.videos, "skipped": self.skipped}
        sh.atomic_write_text(self.json_path, json.dumps(record, separators=(",", ":")))
        return record


def _skip(job: Job, video_key: str, reason: str, **extra) -> dict:
    return {"video": video_key, "split": job.split, "method": job.method, "input": job.source, "reason": reason,
            **extra}


def _video_entry(job: Job, key: str, source: str, total: int, requested: int | None) -> dict:
    return {"key": key, "dataset": job.dataset, "split": job.split, "label": job.label, "method": job.method,
            "compression": job.compression, "source": source, "frames_total": total, "frames_requested": requested,
            "samples": []}


def _encode_frames(job: Job, opts: CropOptions, key: str, frames: Iterator[tuple[int, object, str]],
                   w: _RecordWriter, entry: dict, crops: bool) -> None:
    """Crop (or take whole), resize, encode and store each (frame index, rgb or bytes, source) item."""
    from fdtrain.data.prep.faces import crop_face, encode_image, pick_face, resize_short_side
    from fdtrain.data.prep.video import load_rgb

    size = opts.size if opts.size is not None else (0 if crops else DEFAULT_DETECTED_SIZE)
    no_face, bad = [], []
    for idx, img, src in frames:
        if isinstance(img, bytes):
            # a stored crop already in the output format and size: keep its bytes (no re-encoding loss)
            if crops and size == 0 and _is_format(img, opts.fmt):
                off, n = w.add(img)
                entry["samples"].append([idx, off, n, src])
                continue
            try:
                img = load_rgb(img)
            except Exception as e:  # PIL raises many types for a damaged file
                bad.append((idx, f"{type(e).__name__}: {e}"))
                continue
        if crops:
            out = resize_short_side(img, size)
        else:
            face = pick_face(_detector(opts.detector).detect(img, video=key, frame=idx, source=job.source))
            if face is None:
                no_face.append(idx)
                continue
            out = crop_face(img, face[0], opts.margin, size)
        off, n = w.add(encode_image(out, opts.fmt, opts.quality))
        entry["samples"].append([idx, off, n, src])
    if no_face:
        reason = "no face found" + (" in any frame" if not entry["samples"] else "")
        w.skipped.append(_skip(job, key, f"{reason} ({len(no_face)} frames)", frames=no_face))
    for idx, why in bad:
        w.skipped.append(_skip(job, key, f"unreadable image: {why}", frames=[idx]))
    if entry["samples"]:
        w.videos.append(entry)


def _is_format(data: bytes, fmt: str) -> bool:
    return data[:3] == b"\xff\xd8\xff" if fmt == "jpg" else data[:8] == b"\x89PNG\r\n\x1a\n"


def _process_video_job(job: VideoJob, opts: CropOptions, w: _RecordWriter) -> None:
    if job.kind == "video":
        try:
            frames, total = read_video_frames(job.path, opts.frames)
        except Exception as e:  # PyAV raises its own error types per FFmpeg error
            w.skipped.append(_skip(job, job.key, f"undecodable video: {type(e).__name__}: {e}"))
            return
        if not frames:
            w.skipped.append(_skip(job, job.key, f"undecodable video: no frames decoded (header says {total})"))
            return
        wanted = len(uniform_indices(total, opts.frames))
        if len(frames) < wanted:  # the header promised more frames than the stream holds
            w.skipped.append(_skip(job, job.key, f"stream ended early: {len(frames)} of {wanted} frames decoded "
                                                 f"(header says {total})"))
        entry = _video_entry(job, job.key, job.source, total, opts.frames)
        _encode_frames(job, opts, job.key, ((i, rgb, job.source) for i, rgb in frames), w, entry, crops=job.crops)
        return
    if job.kind == "frames":
        paths = sorted((p for p in Path(job.path).iterdir() if p.suffix.lower() in SOURCE_IMAGE_SUFFIXES),
                       key=lambda p: natural_key(p.name))
        srcs = [f"{job.source}/{p.name}" for p in paths]
    else:
        paths = [Path(f) for f in job.files]
        base = Path(job.files[0]).parent
        srcs = [str(PurePosixPath(job.source) / _rel_or_abs(p, base)) for p in paths]
    if not paths:
        w.skipped.append(_skip(job, job.key, "no image files"))
        return
    nums = frame_numbers([p.name for p in paths])
    chosen = uniform_indices(len(paths), opts.frames)
    entry = _video_entry(job, job.key, job.source, len(paths), opts.frames)

    def items():
        for i in chosen:
            try:
                data = paths[i].read_bytes()
            except OSError as e:
                w.skipped.append(_skip(job, job.key, f"unreadable image: {e}", frames=[nums[i]]))
                continue
            yield nums[i], data, srcs[i]

    _encode_frames(job, opts, job.key, items(), w, entry, crops=job.crops)


def _rel_or_abs(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.as_posix()


def _seq_key(job: ArchiveJob, seq: str) -> str:
    parts = [sh.clean_component(c) for c in PurePosixPath(seq).parts if c not in ("", ".")]
    return "/".join([job.key_prefix, *parts]) if parts else job.key_prefix


def _process_archive_job(job: ArchiveJob, opts: CropOptions, w: _RecordWriter) -> None:
    """Each folder of images inside the archive is one video (face crops: no detection).

    A damaged archive (truncated download, corrupt member) costs the sequences it damages, not the
    archive: what was read before the damage is kept, and each lost sequence is recorded as skipped.
    """
    members: list[str] = []
    broken = None  # (member being read, error) where the listing stopped
    try:
        with tarfile.open(job.path, mode="r:*") as tar:
            for m in tar:
                if m.isfile():
                    members.append(m.name)
    except Exception as e:  # tarfile/gzip/zlib/EOF errors
        if not members:
            w.skipped.append(_skip(job, job.key_prefix, f"unreadable archive: {type(e).__name__}: {e}"))
            return
        broken = (members[-1], f"{type(e).__name__}: {e}")
    seqs: dict[str, list[str]] = defaultdict(list)
    for name in members:
        p = PurePosixPath(name)
        if p.suffix.lower() in SOURCE_IMAGE_SUFFIXES and not p.name.startswith("."):
            seqs[str(p.parent)].append(name)
    if broken is not None:  # the sequence being listed when the archive broke may be incomplete
        cut = str(PurePosixPath(broken[0]).parent)
        if seqs.pop(cut, None) is not None:
            w.skipped.append(_skip(job, _seq_key(job, cut), f"unreadable archive member after {broken[0]}: "
                                                            f"{broken[1]} (the archive's other sequences are kept)"))
    if not seqs:
        if broken is None:
            w.skipped.append(_skip(job, job.key_prefix, "archive holds no images"))
        return
    chosen: dict[str, tuple[str, int]] = {}  # member -> (sequence, frame index)
    plan = {}
    for seq, names in sorted(seqs.items()):
        names.sort(key=lambda n: natural_key(PurePosixPath(n).name))
        nums = frame_numbers([PurePosixPath(n).name for n in names])
        plan[seq] = (names, nums)
        for i in uniform_indices(len(names), opts.frames):
            chosen[names[i]] = (seq, nums[i])
    data: dict[str, bytes] = {}
    failure = None
    current = ""
    try:
        with tarfile.open(job.path, mode="r:*") as tar:  # a second pass reads only the chosen frames
            for m in tar:
                current = m.name
                if m.name in chosen:
                    f = tar.extractfile(m)
                    data[m.name] = f.read() if f is not None else b""
                if len(data) == len(chosen):
                    break
    except Exception as e:
        failure = (f"unreadable archive member {current}: {type(e).__name__}: {e} "
                   "(the archive's other sequences are kept)")
    for seq, (names, _nums) in plan.items():
        key = _seq_key(job, seq)
        if failure is not None and any(n in chosen and n not in data for n in names):
            w.skipped.append(_skip(job, key, failure))
            continue
        entry = _video_entry(job, key, f"{job.source}:{seq}", len(names), opts.frames)
        items = [(chosen[n][1], data[n], f"{job.source}:{n}") for n in names if n in chosen and n in data]
        _encode_frames(job, opts, key, iter(items), w, entry, crops=True)


def process_job(job: Job, opts: CropOptions, work: str) -> dict:
    """Run one job and write its record; returns a short summary for the progress bar."""
    rid = opts.record_id(job)
    w = _RecordWriter(Path(work), rid)
    try:
        if isinstance(job, ArchiveJob):
            _process_archive_job(job, opts, w)
        else:
            _process_video_job(job, opts, w)
    except Exception as e:  # anything unforeseen in one input must not stop the other thousands
        w.videos.clear()
        key = job.key_prefix if isinstance(job, ArchiveJob) else job.key
        w.skipped.append(_skip(job, key, f"failed: {type(e).__name__}: {e}"))
    w.finish(job, rid)
    return {"samples": sum(len(v["samples"]) for v in w.videos), "skipped": len(w.skipped)}


def _process_star(args):
    return process_job(*args)


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def run_jobs(jobs: list[Job], opts: CropOptions, work: Path, workers: int = 1, progress: bool = True) -> dict:
    """Process the jobs that have no record yet; returns {"done", "pending", "samples", "skipped"}."""
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if not (work / f"{opts.record_id(j)}.json").is_file()]
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    stats = {"done": len(jobs) - len(pending), "pending": len(pending), "samples": 0, "skipped": 0}
    if not pending:
        return stats
    bar = tqdm(total=len(pending), unit="video", desc="ingest", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    args = [(j, opts, str(work)) for j in pending]
    pool = None
    try:
        if workers <= 1:
            results = map(_process_star, args)
        else:
            import multiprocessing as mp

            # spawn: the parent may hold threads (PyAV, torch in tests) that fork would copy mid-lock
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
            results = pool.imap_unordered(_process_star, args, chunksize=1)
        for n, r in enumerate(results, 1):
            stats["samples"] += r["samples"]
            stats["skipped"] += r["skipped"]
            bar.update(1)
            bar.set_postfix(crops=stats["samples"], skipped=stats["skipped"], refresh=False)
            if kill_after and n >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 2: records -> shards
# ---------------------------------------------------------------------------------------------
def load_records(jobs: list[Job], opts: CropOptions, work: Path) -> dict[str, dict]:
    records, missing = {}, []
    for j in jobs:
        rid = opts.record_id(j)
        try:
            records[rid] = json.loads((work / f"{rid}.json").read_text())
        except FileNotFoundError:
            missing.append(j.source)
    if missing:
        raise RuntimeError(f"{len(missing)} jobs have no record in {work} (e.g. {missing[0]}); "
                           "run the process stage for them first")
    return records


class _BinReader:
    """Reads sample bytes from record files, keeping a few open."""

    def __init__(self, work: Path, keep: int = 64):
        self.work, self.keep, self._open = work, keep, {}

    def read(self, rid: str, off: int, n: int) -> bytes:
        f = self._open.pop(rid, None) or open(self.work / f"{rid}.bin", "rb")
        self._open[rid] = f
        if len(self._open) > self.keep:
            self._open.pop(next(iter(self._open))).close()
        f.seek(off)
        data = f.read(n)
        if len(data) != n:
            raise OSError(f"{self.work / (rid + '.bin')}: short read at {off} ({len(data)} of {n} bytes)")
        return data

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def assemble(plan: Plan, opts: CropOptions, out: Path, work: Path, *, seed: int = 0, shard_bytes: int = 256 << 20,
             min_shards: int = 8, extra: dict | None = None) -> dict[str, dict]:
    """Write one shard folder per output split; returns {split name: manifest}."""
    records = load_records(plan.needed_jobs(), opts, work)
    reader = _BinReader(work)
    manifests = {}
    try:
        for output in plan.outputs:
            manifests[output.name] = _assemble_one(output, plan, records, reader, opts, out, seed=seed,
                                                   shard_bytes=shard_bytes, min_shards=min_shards, extra=extra or {})
    finally:
        reader.close()
    return manifests


def _assemble_one(output: OutputSplit, plan: Plan, records: dict, reader: _BinReader, opts: CropOptions,
                  out: Path, *, seed: int, shard_bytes: int, min_shards: int, extra: dict) -> dict:
    refs, skipped, short = [], [], []
    for rid in sorted(records):
        rec = records[rid]
        for v in rec["videos"]:
            if not output.wants(v["split"], v["method"]):
                continue
            if v["frames_requested"] is not None and v["frames_total"] < v["frames_requested"]:
                short.append({"video": v["key"], "frames": v["frames_total"], "requested": v["frames_requested"]})
            for frame, off, n, src in v["samples"]:
                refs.append((sh.frame_key(v["key"], frame), rid, off, n, src, frame, v))
        skipped += [s for s in rec["skipped"] if output.wants(s["split"], s["method"])]
    skipped += [p for p in plan.problems if output.wants(p.get("split", ""), p.get("method", ""))]
    refs.sort(key=lambda r: r[0])
    random.Random(f"{seed}:{output.name}").shuffle(refs)  # across videos and classes; buffers downstream are local
    counts = sh.plan_shards(len(refs), sum(r[3] + SAMPLE_OVERHEAD for r in refs), shard_bytes, min_shards)

    def samples():
        for key, rid, off, n, src, frame, v in refs:
            meta = {"key": key, "dataset": v["dataset"], "split": v["split"], "method": v["method"],
                    "compression": v["compression"], "video": v["key"], "frame": frame, "label": v["label"],
                    "source": src}
            yield sh.Sample(key, reader.read(rid, off, n), opts.fmt, v["label"], meta)

    skipped.sort(key=lambda s: (s["video"], s["reason"]))
    manifest_extra = {
        "source_split": output.split,
        "methods": sorted(output.methods) if output.methods is not None else None,
        "skipped": skipped,
        "short_videos": sorted(short, key=lambda s: s["video"]),
        "crop": asdict(opts),
        "seed": seed,
        **extra,
    }
    return sh.write_split(samples(), out / output.name, counts, manifest_extra)


def summarize(manifests: dict[str, dict]) -> str:
    """Counts per split and skipped inputs grouped by reason, for the end of a run."""
    lines = [f"{'split':<24} {'samples':>8} {'videos':>7} {'real':>7} {'fake':>7} {'shards':>6} {'skipped':>7}"]
    reasons: Counter = Counter()
    seen = set()
    for name, m in manifests.items():
        c = m["counts"]["label"]
        lines.append(f"{name:<24} {m['num_samples']:>8} {m['num_videos']:>7} {c['0']:>7} {c['1']:>7} "
                     f"{m['num_shards']:>6} {len(m['skipped']):>7}")
        for s in m["skipped"]:
            ident = (s["video"], s["reason"])
            if ident not in seen:  # a test real appears in several test folders; count it once
                seen.add(ident)
                reasons[s["reason"].split(":")[0].split(" (")[0]] += 1
        if m["short_videos"]:
            lines.append(f"  {name}: {len(m['short_videos'])} videos shorter than the frames asked for")
    if reasons:
        lines.append("skipped inputs by reason: " + ", ".join(f"{r}: {n}" for r, n in reasons.most_common()))
    return "\n".join(lines)
