"""FaceForensics++ as distributed (also the layout the synthetic benchmark writes).

    <root>/original_sequences/youtube/<comp>/videos/000.mp4
    <root>/manipulated_sequences/<Method>/<comp>/videos/000_003.mp4
    <root>/splits/{train,val,test}.json        (or --splits-dir; lists of id pairs [["953","974"], ...])

A split file's ids are the real videos; each pair [a, b] gives the fakes a_b and b_a. Instead of
``videos/`` a method may hold ``frames/<video>/<frame>.png`` (pre-extracted face crops; the
synthetic benchmark writes those). DeepFakeDetection (Google's, with its actors' reals under
``original_sequences/actors``) has no official split: all of it goes to ``test``.

Keys: ``ffpp/c23/Deepfakes/000_003`` and ``ffpp/c23/original/000`` (+ ``/<frame>`` per sample).
"""
from __future__ import annotations

import json
from pathlib import Path

from fdtrain.data.format import clean_component
from fdtrain.data.prep.sources import REAL_METHOD, OutputSplit, Plan, SourceOptions, VideoJob, rel
from fdtrain.data.prep.video import VIDEO_EXTS

STANDARD_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
PAIR_METHODS = STANDARD_METHODS + ("FaceShifter",)
DFD = "DeepFakeDetection"
DFD_REAL = "original_actors"
SPLITS = ("train", "val", "test")


def read_split_lists(splits_dir: Path) -> dict[str, str]:
    """{video name: split} for reals ("953") and pair fakes ("953_974", "974_953")."""
    out: dict[str, str] = {}
    for split in SPLITS:
        path = splits_dir / f"{split}.json"
        try:
            pairs = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: FF++ split file missing (pass --splits-dir)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"{path}: entry {i} should be a pair of ids, got {pair!r}")
            a, b = (str(x) for x in pair)
            for name in (a, b, f"{a}_{b}", f"{b}_{a}"):
                if out.get(name, split) != split:
                    raise ValueError(f"{path}: {name} is also in {out[name]}.json")
                out[name] = split
    return out


def _inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """{video name: (path, kind)} from ``videos/`` files and ``frames/`` sub-folders."""
    found: dict[str, tuple[Path, str]] = {}
    vids = folder / "videos"
    if vids.is_dir():
        for p in sorted(vids.iterdir()):
            if p.suffix.lower() in VIDEO_EXTS:
                found[p.stem] = (p, "video")
    frames = folder / "frames"
    if frames.is_dir():
        for p in sorted(frames.iterdir()):
            if p.is_dir() and p.name not in found:
                found[p.name] = (p, "frames")
    return found


def enumerate_jobs(root: Path, opts: SourceOptions, dataset: str = "ffpp", crops: bool = False) -> Plan:
    comp = opts.compression
    root = Path(root)
    if not (root / "original_sequences").is_dir():
        raise FileNotFoundError(f"{root}: no original_sequences/ folder; is this an FF++ root?")
    splits_dir = Path(opts.splits_dir) if opts.splits_dir else (
        root / "splits" if (root / "splits" / "train.json").exists() else root)
    split_of = read_split_lists(splits_dir)
    manip = root / "manipulated_sequences"
    present = sorted(p.name for p in manip.iterdir() if (p / comp).is_dir()) if manip.is_dir() else []
    methods = tuple(m for m in STANDARD_METHODS if m in present) if opts.methods is None else opts.methods
    for m in methods:
        if m not in present:
            raise FileNotFoundError(
                f"{manip / m / comp}: method {m} not found (present: {', '.join(present) or 'none'})")
    test_methods = [m for m in present if m in PAIR_METHODS + (DFD,)] if opts.holdout_tests else []
    wanted = set(methods) | set(test_methods)

    plan = Plan(jobs=[], outputs=[])
    key_base = f"{clean_component(dataset)}/{clean_component(comp)}"
    comp_real = root / "original_sequences" / "youtube" / comp
    if not comp_real.is_dir():
        raise FileNotFoundError(f"{comp_real}: real videos not found for compression {comp}")
    groups: list[tuple[str, int, Path]] = [(REAL_METHOD, 0, comp_real)]
    groups += [(m, 1, manip / m / comp) for m in sorted(wanted)]
    if DFD in wanted and (root / "original_sequences" / "actors" / comp).is_dir():
        groups.append((DFD_REAL, 0, root / "original_sequences" / "actors" / comp))
    unlisted = 0
    for method, label, folder in groups:
        found = _inputs(folder)
        if method in (DFD, DFD_REAL):
            names = {n: "test" for n in found}
        else:
            names = {}
            for n in found:
                if n in split_of and (label == 0) == ("_" not in n):
                    names[n] = split_of[n]
                else:
                    unlisted += 1
            # listed in a split file but absent on disk: a gap the manifest should show
            for n, s in split_of.items():
                if (label == 0) == ("_" not in n) and n not in found and s in opts.splits:
                    plan.problems.append({"video": f"{key_base}/{method}/{clean_component(n)}", "split": s,
                                          "method": method, "input": rel(folder, root),
                                          "reason": f"listed in {s}.json but not found"})
        for n, split in sorted(names.items()):
            path, kind = found[n]
            plan.jobs.append(VideoJob(
                key=f"{key_base}/{clean_component(method)}/{clean_component(n)}", dataset=dataset, split=split,
                label=label, method=method, compression=comp, source=rel(path, root), path=str(path), kind=kind,
                crops=crops and kind == "frames"))
    if unlisted:
        plan.notes.append(f"{unlisted} videos are in no split list and were left out")
    if not plan.jobs:
        plan.notes.append(f"no videos found under {root}")
    keep = frozenset((REAL_METHOD, *methods, *((DFD_REAL,) if DFD in methods else ())))
    plan.outputs = [OutputSplit(s, s, keep) for s in opts.splits]
    for m in test_methods:
        real = DFD_REAL if m == DFD else REAL_METHOD
        plan.outputs.append(OutputSplit(f"test_{m}", "test", frozenset((real, m))))
    return plan
