"""What a resumed run may change in its config, and the record of what it changed.

A checkpoint continues one model on one data stream: the model (every ``model.*`` field that
shapes the network or its computation), the training data and the seed cannot change on resume;
such a resume is refused with the old and new values. Everything else may change and takes effect
from the first resumed step (lr and schedule lengths through the rebuilt schedule, cadences and
evaluation sets because the loop reads them from the config, optimizer hyper-parameters because
they are set again after the optimizer state is loaded); each change is printed and appended to
``runs/<name>/config_changes.jsonl``, and ``config.yaml`` is rewritten to what runs now.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fdtrain.config import Config, ConfigError

# Fields that define the weights' meaning or the data stream of the run. model.* fields that only
# affect initial weights or memory layout may change.
FIXED_PREFIXES = ("model.",)
FIXED_FIELDS = ("data.train", "run.seed")
MAY_CHANGE_IN_MODEL = ("model.pretrained", "model.pretrained_path", "model.channels_last")
# Not part of what runs (where it runs from, how it is shown): neither refused nor recorded.
IGNORED = ("run.resume", "run.out_dir", "run.name", "logging.progress")
CHANGES_FILE = "config_changes.jsonl"


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "data." and k == "test"):  # data.test is one value
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(old: dict[str, Any], new: Config, where: str) -> dict[str, tuple[Any, Any]]:
    """The fields that changed ``{key: (old, new)}``; raises ConfigError when a fixed one did.

    A field the old config does not have (written by an older fdtrain) counts as unchanged.
    """
    before, after = flat(old), flat(new.to_dict())
    changed = {k: (before[k], v) for k, v in after.items() if k in before and before[k] != v and k not in IGNORED}
    fixed = {k: ov for k, ov in changed.items()
             if (k.startswith(FIXED_PREFIXES) and k not in MAY_CHANGE_IN_MODEL) or k in FIXED_FIELDS}
    if fixed:
        lines = "; ".join(f"{k}: {o!r} (checkpoint) -> {n!r} (now)" for k, (o, n) in fixed.items())
        raise ConfigError(f"resume from {where}: these fields cannot change on resume: {lines}. Resume with the "
                          "checkpoint's values (its run folder's config.yaml), or start a new run (another "
                          "--run.name; model.pretrained_path can point at the checkpoint's model.pt weights)")
    return changed


def record(run_dir: str | Path, step: int, checkpoint: str, changed: dict[str, tuple[Any, Any]]) -> None:
    """Append one JSON line: when, from which checkpoint, which fields changed (rank 0)."""
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "step": step, "checkpoint": checkpoint,
             "changed": {k: {"old": o, "new": n} for k, (o, n) in changed.items()}}
    with open(Path(run_dir) / CHANGES_FILE, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changed.items())
