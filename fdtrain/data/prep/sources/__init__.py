"""Dataset sources: each turns a dataset tree into jobs (units of ingestion work) and output splits.

A source module defines ``enumerate_jobs(root: Path, opts: SourceOptions) -> Plan``. Jobs are
plain frozen dataclasses so they pickle to worker processes and hash to stable ids (the resume
records are named by them).
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SOURCES = ("ffpp", "celebdf", "wdf", "folders", "synth")
REAL_METHOD = "original"  # FF++'s name for the pristine videos; other sources use theirs


@dataclass(frozen=True)
class VideoJob:
    """One video: a video file, a folder of frames, or an explicit list of frame files."""

    key: str  # video key, e.g. ffpp/c23/Deepfakes/000_003 (no dots)
    dataset: str
    split: str  # split of the source protocol: train / val / test
    label: int  # 0 real, 1 fake
    method: str
    compression: str
    source: str  # path relative to the dataset root, stored in every sample's json
    path: str  # absolute path: video file or frames folder ("" for kind "files")
    kind: str = "video"  # video | frames | files
    files: tuple[str, ...] = ()  # kind "files": absolute paths of the frames, in order
    crops: bool = False  # frames are face crops already: no detection

    @property
    def id(self) -> str:
        return _digest(asdict(self))


@dataclass(frozen=True)
class ArchiveJob:
    """One archive of face-sequence folders (WildDeepfake); each folder of images is a video."""

    key_prefix: str  # e.g. wdf/fake_train/<archive name>
    dataset: str
    split: str
    label: int
    method: str
    compression: str
    source: str
    path: str
    kind: str = "archive"
    crops: bool = True

    @property
    def id(self) -> str:
        return _digest(asdict(self))


Job = VideoJob | ArchiveJob


@dataclass(frozen=True)
class OutputSplit:
    """One shard folder to write: samples of source split ``split`` whose method is in ``methods``."""

    name: str
    split: str
    methods: frozenset[str] | None = None  # None: every method

    def wants(self, split: str, method: str) -> bool:
        return split == self.split and (self.methods is None or method in self.methods)


@dataclass
class Plan:
    jobs: list[Job]
    outputs: list[OutputSplit]
    # inputs refused before any decoding (listed but missing, unreadable rows...), as skipped entries
    problems: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed at the start (e.g. videos not in any split)

    def needed_jobs(self) -> list[Job]:
        return [j for j in self.jobs if any(o.wants(j.split, j.method) for o in self.outputs)]


@dataclass
class SourceOptions:
    """What `fdtrain shards make` passes to a source (fields a source does not use are ignored)."""

    splits: tuple[str, ...] = ("train", "val", "test")
    methods: tuple[str, ...] | None = None  # ffpp/synth: manipulation methods; None = the four standard ones
    holdout_tests: bool = False  # ffpp/synth: also test_<Method> folders, one per method present
    compression: str = "c23"
    splits_dir: str = ""  # ffpp: folder of train/val/test.json ('' = <root>/splits, else <root>)
    val_percent: float = 10.0  # celebdf/wdf: share of training identities/archives held out as val
    csv: str = ""  # folders: CSV with path,label,video,split columns
    rule: str = ""  # folders: regex with named groups split, label, video (method optional)
    name: str = ""  # dataset name in keys ('' = the source's name)
    detect_frames: bool = False  # folders: run the detector on image frames too


def load_source(name: str):
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")
    return importlib.import_module(f"fdtrain.data.prep.sources.{name}")


def hashed_percent(text: str) -> float:
    """A stable value in [0, 100) for a name: the deterministic val carve-out of celebdf and wdf."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 10000 / 100.0


def _digest(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:20]


def rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
