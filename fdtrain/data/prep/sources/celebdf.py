"""Celeb-DF (v2) as distributed.

    <root>/Celeb-real/id0_0000.mp4  <root>/YouTube-real/00000.mp4  <root>/Celeb-synthesis/id0_id16_0000.mp4
    <root>/List_of_testing_videos.txt      lines "1 YouTube-real/00170.mp4"

The test list writes **1 for real and 0 for fake** (the inverse of our labels); the folder a video
sits in must agree, else the list is refused. Train is every video not in the list. Val is carved
from train by identity, so no person is in both: a training video goes to val when
``sha1(identity) % 100 < val_percent`` (default 10), where the identity is the first ``idN`` of
the name for Celeb-real/Celeb-synthesis (the target person) and the file name for YouTube-real.

Keys: ``celebdf/Celeb-synthesis/id0_id16_0000`` (+ ``/<frame>``); the method is the folder name.
"""
from __future__ import annotations

import re
from pathlib import Path

from fdtrain.data.format import clean_component
from fdtrain.data.prep.sources import OutputSplit, Plan, SourceOptions, VideoJob, hashed_percent, rel
from fdtrain.data.prep.video import VIDEO_EXTS

FOLDERS = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}
TEST_LIST = "List_of_testing_videos.txt"


def read_test_list(path: Path) -> dict[str, int]:
    """{"YouTube-real/00170.mp4": our label} from the official list (its 1 = real -> our 0)."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: Celeb-DF test list missing") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected '<0|1> <folder>/<video>', got {line!r}")
        rel_path = parts[1].replace("\\", "/")
        label = 1 - int(parts[0])  # the list's 1 means real
        folder = rel_path.split("/")[0]
        if folder in FOLDERS and FOLDERS[folder] != label:
            raise ValueError(f"{path}:{n}: {rel_path} is marked {parts[0]} but its folder says "
                             f"{'real' if FOLDERS[folder] == 0 else 'fake'} (the list writes 1 for real)")
        out[rel_path] = label
    return out


def identity(folder: str, stem: str) -> str:
    m = re.match(r"(id\d+)", stem)
    return f"celeb:{m.group(1)}" if (m and folder != "YouTube-real") else f"{folder}:{stem}"


def enumerate_jobs(root: Path, opts: SourceOptions) -> Plan:
    root = Path(root)
    dataset = opts.name or "celebdf"
    test = read_test_list(root / TEST_LIST)
    plan = Plan(jobs=[], outputs=[OutputSplit(s, s) for s in opts.splits])
    found = set()
    for folder, label in FOLDERS.items():
        d = root / folder
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: Celeb-DF folder missing")
        for p in sorted(d.iterdir()):
            if p.suffix.lower() not in VIDEO_EXTS:
                continue
            r = f"{folder}/{p.name}"
            found.add(r)
            if r in test:
                split = "test"
            else:
                split = "val" if hashed_percent(identity(folder, p.stem)) < opts.val_percent else "train"
            plan.jobs.append(VideoJob(
                key=f"{clean_component(dataset)}/{folder}/{clean_component(p.stem)}", dataset=dataset,
                split=split, label=label, method=folder, compression="", source=rel(p, root), path=str(p)))
    for r in test:
        if r not in found and "test" in opts.splits:
            folder, _, name = r.partition("/")
            plan.problems.append({"video": f"{clean_component(dataset)}/{folder}/{clean_component(Path(name).stem)}",
                                  "split": "test", "method": folder, "input": r,
                                  "reason": f"listed in {TEST_LIST} but not found"})
    return plan
