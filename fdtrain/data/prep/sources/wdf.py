"""WildDeepfake as distributed: face-sequence folders inside ``.tar.gz`` archives.

    <root>/{real_train,real_test,fake_train,fake_test}/<archive>.tar.gz
        -> <any path>/<sequence folder>/<frame>.png|jpg

The images are face crops already, so nothing is detected. Each folder of images inside an
archive is one video, keyed ``wdf/<archive folder>/<archive name>/<folder path>`` so that two
archives' sequences never collide. One job per archive (it is read as a stream, twice: once to
list, once to extract the chosen frames). Val is carved from train by archive, never splitting
an archive: ``sha1(<folder>/<archive>) % 100 < val_percent`` (default 10).
"""
from __future__ import annotations

from pathlib import Path

from fdtrain.data.format import clean_component
from fdtrain.data.prep.sources import ArchiveJob, OutputSplit, Plan, SourceOptions, hashed_percent, rel

FOLDERS = {"real_train": (0, "train"), "real_test": (0, "test"), "fake_train": (1, "train"), "fake_test": (1, "test")}
ARCHIVE_EXTS = (".tar.gz", ".tgz", ".tar")


def archive_stem(name: str) -> str:
    for ext in ARCHIVE_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def enumerate_jobs(root: Path, opts: SourceOptions) -> Plan:
    root = Path(root)
    dataset = opts.name or "wdf"
    plan = Plan(jobs=[], outputs=[OutputSplit(s, s) for s in opts.splits])
    missing = [f for f in FOLDERS if not (root / f).is_dir()]
    if len(missing) == len(FOLDERS):
        raise FileNotFoundError(f"{root}: none of {', '.join(FOLDERS)} found; is this a WildDeepfake root?")
    for f in missing:
        plan.notes.append(f"{root / f}: missing, nothing taken from it")
    for folder, (label, split0) in FOLDERS.items():
        d = root / folder
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not p.is_file() or not p.name.lower().endswith(ARCHIVE_EXTS):
                continue
            split = split0
            if split0 == "train" and hashed_percent(f"{folder}/{p.name}") < opts.val_percent:
                split = "val"
            plan.jobs.append(ArchiveJob(
                key_prefix=f"{clean_component(dataset)}/{folder}/{clean_component(archive_stem(p.name))}",
                dataset=dataset, split=split, label=label, method="real" if label == 0 else "fake",
                compression="", source=rel(p, root), path=str(p)))
    return plan
