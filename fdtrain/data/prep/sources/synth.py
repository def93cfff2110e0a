"""The synthetic benchmark written by `fdtrain synth`: an FF++ tree of face-crop frame folders.

Same layout, split lists and method names as FF++ (see ``ffpp``), dataset name ``synth`` and the
compression named in ``<root>/synth.json`` (``raw``). The frames are face crops: no detection.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fdtrain.data.prep.sources import Plan, SourceOptions, ffpp


def enumerate_jobs(root: Path, opts: SourceOptions) -> Plan:
    info_path = Path(root) / "synth.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{info_path}: not found; make the benchmark with `fdtrain synth --out {root}`") from None
    opts = replace(opts, compression=info.get("compression", "raw"), splits_dir=opts.splits_dir)
    return ffpp.enumerate_jobs(Path(root), opts, dataset=opts.name or "synth", crops=True)
