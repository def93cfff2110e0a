"""Hostile but realistic input through the real command line: each gives one clear message and
exit 2 (no traceback), and nothing from an untrusted file runs."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from fdtrain.engine import checkpoint as ck
from tests import _engine_utils as U

LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]")  # logging records (INFO/WARNING), not the error


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return U.write_easy_dataset(tmp_path_factory.mktemp("hostile") / "data", train_videos=4, eval_videos=2, shards=2)


def _train(tmp_path, data, name, *extra, **fields):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {{name: {name}}}\n")
    args = U.overrides(data, tmp_path / "runs", name, **{"data.test": {}, "data.val": "", **fields})
    return U.run(U.fdtrain_cmd("train", str(recipe), *args, *extra))


def _one_message(proc, *parts: str) -> str:
    """Exit 2 and a stderr of one line (no traceback) holding every part."""
    assert proc.returncode == 2, U.explain(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, U.explain(proc)
    for p in parts:
        assert p in lines[0], U.explain(proc)
    return lines[0]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_resume_from_a_crafted_checkpoint_runs_nothing(tmp_path, data):
    done = _train(tmp_path, data, "good", **{"train.max_steps": 2})
    assert done.returncode == 0, U.explain(done)
    crafted = tmp_path / "crafted"
    shutil.copytree(ck.newest_checkpoint(tmp_path / "runs" / "good" / "checkpoints"), crafted)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "epoch": 0, "scheduler": _RunsCode(marker)}, crafted / "train_state.pt")
    proc = _train(tmp_path, data, "victim", "--resume", str(crafted), **{"train.max_steps": 4})
    _one_message(proc, f"{crafted / 'train_state.pt'}: refused: unpickling it would import", "system")
    assert not marker.exists()
