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


def _png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _audio_only_mp4(path) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        stream = c.add_stream("aac", rate=8000)
        for i in range(3):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)


def test_predict_reports_each_bad_input_and_scores_the_rest(tmp_path, data):
    """A decompression bomb and a container without a video stream get an error in their JSON line;
    the inputs after them are still scored."""
    import json
    import tarfile

    from fdtrain.config import from_dict
    from fdtrain.models import create_model_from_config

    cfg = from_dict({"model": {"input_size": 64}})
    torch.save({"format": ck.MODEL_FORMAT, "config": cfg.to_dict(), "step": 0, "epoch": 0, "metrics": {},
                "state_dict": create_model_from_config(cfg.model).state_dict()}, tmp_path / "model.pt")
    (tmp_path / "bomb.png").write_bytes(_png_claiming(40000, 40000))
    _audio_only_mp4(tmp_path / "audio.mp4")
    with tarfile.open(data / "test" / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "face.jpg").write_bytes(tar.extractfile(member).read())
    inputs = [tmp_path / n for n in ("bomb.png", "audio.mp4", "face.jpg")]
    proc = U.run(U.fdtrain_cmd("predict", "--checkpoint", str(tmp_path / "model.pt"), *map(str, inputs)))
    assert proc.returncode == 1, U.explain(proc)  # some inputs could not be scored
    bomb, audio, face = (json.loads(line) for line in proc.stdout.splitlines())
    assert bomb["score"] is None and "DecompressionBombError" in bomb["error"] and "1600000000 pixels" in bomb["error"]
    assert audio["score"] is None and "no video stream in this container (streams: ['audio'])" in audio["error"]
    assert 0.0 <= face["score"] <= 1.0 and face["label"] in ("real", "fake")
    assert "2 input(s) could not be scored" in proc.stderr


@pytest.fixture()
def small_disk(tmp_path):
    """A 96 MiB tmpfs: room for the run folder, not for a checkpoint (about 170 MB)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_one_message(tmp_path, data, small_disk):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: full}\n")
    args = U.overrides(data, small_disk, "full", **{"data.test": {}, "data.val": "", "train.max_steps": 1})
    proc = U.run(U.fdtrain_cmd("train", str(recipe), *args))
    line = _one_message(proc, "disk full while writing checkpoint", str(small_disk / "full" / "checkpoints"),
                        "free on the file system of", "--resume auto")
    assert re.search(r"rank 0; \d+(\.\d)? (B|KiB|MiB) free", line), line
    assert not list((small_disk / "full" / "checkpoints").iterdir()), "the incomplete checkpoint was left behind"
