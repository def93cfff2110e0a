"""Any tree of frames or face crops (e.g. another project's preprocessing output).

Two ways to say what each file is:

- ``--csv FILE``: columns ``path,label,video,split`` (optional ``method``). ``path`` is relative
  to the root (or absolute), an image or a video file; ``label`` is 0/1 or real/fake;
  ``video`` groups frames (empty: the file is its own video); ``split`` is train/val/test or any
  name (it becomes the folder name).
- ``--rule REGEX``: matched against every file's path relative to the root, with named groups
  ``split``, ``label`` and ``video`` (``method`` optional). Default:
  ``(?P<split>[^/]+)/(?P<label>[^/]+)/(?P<video>[^/]+)/[^/]+`` i.e. ``<split>/<real|fake>/<video>/<frame>``.

Images are taken as face crops (no detection) unless ``--detect-frames``; videos are always
detected. Keys: ``<name>/<method or real|fake>/<video>`` (+ ``/<frame>``).
"""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

from fdtrain.data.format import SOURCE_IMAGE_SUFFIXES, clean_component
from fdtrain.data.prep.sources import OutputSplit, Plan, SourceOptions, VideoJob, rel
from fdtrain.data.prep.video import VIDEO_EXTS, natural_key

DEFAULT_RULE = r"(?P<split>[^/]+)/(?P<label>[^/]+)/(?P<video>[^/]+)/[^/]+"
LABELS = {"0": 0, "real": 0, "original": 0, "pristine": 0, "1": 1, "fake": 1, "manipulated": 1}


def parse_dataset_label(text: str, where: str) -> int:
    """A label word of a dataset's CSV or folder names (real/fake/0/1...), not a shard's cls member."""
    try:
        return LABELS[str(text).strip().lower()]
    except KeyError:
        raise ValueError(f"{where}: label {text!r} is not one of {sorted(LABELS)}") from None


def _rows_from_csv(path: Path, root: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"path", "label", "split"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{path}: missing column(s) {', '.join(sorted(missing))} (need path,label,video,split)")
            rows = []
            for n, r in enumerate(reader, 2):
                p = Path(r["path"])
                rows.append({"path": p if p.is_absolute() else root / p,
                             "label": parse_dataset_label(r["label"], f"{path}:{n}"),
                             "video": (r.get("video") or "").strip(), "split": r["split"].strip(),
                             "method": (r.get("method") or "").strip(), "where": f"{path}:{n}"})
            return rows
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: CSV not found") from None


def _rows_from_rule(rule: str, root: Path) -> tuple[list[dict], int]:
    rx = re.compile(rule)
    for g in ("split", "label", "video"):
        if g not in rx.groupindex:
            raise ValueError(f"--rule {rule!r}: needs a named group (?P<{g}>...)")
    rows, unmatched = [], 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in SOURCE_IMAGE_SUFFIXES + VIDEO_EXTS:
            continue
        r = rel(p, root)
        m = rx.fullmatch(r)
        if not m:
            unmatched += 1
            continue
        g = m.groupdict()
        rows.append({"path": p, "label": parse_dataset_label(g["label"], f"{r} (--rule)"), "video": g["video"],
                     "split": g["split"], "method": g.get("method") or "", "where": r})
    return rows, unmatched


def enumerate_jobs(root: Path, opts: SourceOptions) -> Plan:
    root = Path(root)
    dataset = opts.name or "folders"
    plan = Plan(jobs=[], outputs=[])
    if opts.csv:
        rows = _rows_from_csv(Path(opts.csv), root)
    else:
        rows, unmatched = _rows_from_rule(opts.rule or DEFAULT_RULE, root)
        if unmatched:
            plan.notes.append(f"{unmatched} files under {root} did not match the rule and were left out")
    videos: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        method = r["method"] or ("real" if r["label"] == 0 else "fake")
        is_video = r["path"].suffix.lower() in VIDEO_EXTS
        video = r["video"] or str(Path(rel(r["path"], root)).with_suffix(""))
        videos[(r["split"], r["label"], method, video, is_video)].append(r)
    splits = set()
    for (split, label, method, video, is_video), members in sorted(videos.items(), key=lambda kv: kv[0]):
        key = "/".join([clean_component(dataset), clean_component(method)]
                       + [clean_component(c) for c in video.replace("\\", "/").split("/") if c])
        splits.add(split)
        missing = [m for m in members if not m["path"].is_file()]
        for m in missing:
            plan.problems.append({"video": key, "split": split, "method": method, "input": m["where"],
                                  "reason": f"file not found: {m['path']}"})
        members = [m for m in members if m["path"].is_file()]
        if not members:
            continue
        if is_video:
            for i, m in enumerate(members):  # several video files under one video name: keep them apart
                k = key if len(members) == 1 else f"{key}/{i}"
                plan.jobs.append(VideoJob(key=k, dataset=dataset, split=split, label=label, method=method,
                                          compression="", source=rel(m["path"], root), path=str(m["path"])))
            continue
        files = tuple(str(m["path"]) for m in sorted(members, key=lambda m: natural_key(m["path"].name)))
        plan.jobs.append(VideoJob(key=key, dataset=dataset, split=split, label=label, method=method, compression="",
                                  source=rel(Path(files[0]).parent, root), path="", kind="files", files=files,
                                  crops=not opts.detect_frames))
    names = opts.splits if opts.splits != SourceOptions.splits else tuple(sorted(splits))
    plan.outputs = [OutputSplit(s, s) for s in names]
    return plan
