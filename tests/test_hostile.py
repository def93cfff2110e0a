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
def data(easy_dataset):
    return easy_dataset(train_videos=4, eval_videos=2, shards=2)


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
    ck.write_model_file(tmp_path / "model.pt", config=cfg.to_dict(), step=0, epoch=0, metrics={},
                        state_dict=create_model_from_config(cfg.model).state_dict())
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


@pytest.mark.slow
@pytest.mark.multiproc
def test_missing_val_test_and_weights_fail_before_training_with_one_message(tmp_path, data):
    """2 ranks under fdtrain.launch: every missing input named in one line from one rank, exit 2."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: early}\n")
    args = U.overrides(data, tmp_path / "runs", "early", **{
        "data.val": str(tmp_path / "no_val"), "data.test": {"cdf": str(tmp_path / "no_cdf")}, "train.max_steps": 2,
        "model.pretrained": "true", "model.pretrained_path": str(tmp_path / "xception.pth")})
    proc = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "train", str(recipe), *args, fdtrain_launch=True))
    _one_message(proc, "fdtrain train: cannot start: ", f"data.val={tmp_path / 'no_val'}: no such folder",
                 f"data.test.cdf={tmp_path / 'no_cdf'}: no such folder",
                 f"model.pretrained_path: no such file: {tmp_path / 'xception.pth'}")
    assert "step 1" not in proc.stdout and not (tmp_path / "runs" / "early" / "checkpoints").exists()


def _corrupt_one_jpeg(split_dir):
    """Same-length garbage over one JPEG inside a shard: the manifest and index still agree."""
    import tarfile

    tar_path = sorted(split_dir.glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with open(tar_path, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\x00" * m.size)
    return m.name[: -len(".jpg")]


@pytest.mark.slow
def test_a_failing_validation_keeps_the_checkpoint_that_was_due(tmp_path, data):
    broken = tmp_path / "data_broken"
    shutil.copytree(data, broken)
    key = _corrupt_one_jpeg(broken / "val")
    proc = _train(tmp_path, broken, "valfail", **{"data.val": str(broken / "val"), "data.backend": "torch"})
    line = _one_message(proc, "data error", key)
    assert "undecodable" in line or "decode" in line, line
    # epoch 1 ended (4 steps): its checkpoint was written before validation failed
    assert ck.newest_checkpoint(tmp_path / "runs" / "valfail" / "checkpoints").name == "step-00000004"
    # continue with the bad sample skipped: it is counted, with its key and reason, in metrics.json
    done = _train(tmp_path, broken, "valfail", "--resume", "auto", **{"data.backend": "torch",
                  "data.on_corrupt": "skip", "data.test": {"broken": str(broken / "val")}})
    assert done.returncode == 0, U.explain(done)
    skipped = U.metrics(tmp_path / "runs" / "valfail")["skipped_samples"]
    assert skipped["broken"]["count"] == 1 and key in skipped["broken"]["samples"], skipped
    assert skipped["train"]["count"] == 0


@pytest.mark.slow
def test_a_run_folder_has_one_live_owner(tmp_path, data):
    """A second run with the same name is refused while the first lives; after the first is
    killed -9 its stale lock is recognised (same host, dead pid) and --resume auto takes over."""
    import json
    import signal
    import subprocess

    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: shared}\n")
    args = U.overrides(data, tmp_path / "runs", "shared", **{"data.test": {}, "data.val": "", "train.max_steps": 400,
                                                            "checkpoint.every_steps": 2})
    run_dir = tmp_path / "runs" / "shared"
    first = subprocess.Popen(U.fdtrain_cmd("train", str(recipe), *args), cwd=U.REPO, env=U.env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert U.wait_for(lambda: ck.newest_checkpoint(run_dir / "checkpoints") is not None, 600, first, poll=0.2)
        owner = json.loads((run_dir / "run.lock").read_text())
        second = U.run(U.fdtrain_cmd("train", str(recipe), *args, "--resume", "auto"))
        _one_message(second, f"{run_dir} is in use by a live run", f"pid {owner['pid']}", "another --run.name")
        assert first.poll() is None, "the refused run disturbed the live one"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / "run.lock").exists()  # a kill -9 leaves it behind
    args = [a for a in args if not a.startswith("--train.max_steps")] + ["--train.max_steps=1"]
    third = U.run(U.fdtrain_cmd("train", str(recipe), *args, "--resume", "auto", "--train.max_steps=1"))
    assert third.returncode == 0, U.explain(third)
    assert "removed the lock of a run that is gone (" in third.stdout and f"pid {owner['pid']}" in third.stdout
    assert not (run_dir / "run.lock").exists()  # released at the end


@pytest.mark.slow
def test_resume_refuses_crafted_files_and_fixed_fields_and_records_the_rest(tmp_path, data):
    import json

    import yaml

    done = _train(tmp_path, data, "rc", **{"train.max_steps": 2})
    assert done.returncode == 0, U.explain(done)
    run_dir = tmp_path / "runs" / "rc"

    # a checkpoint whose unpickling would run a shell command: refused, nothing runs
    crafted = tmp_path / "crafted"
    shutil.copytree(ck.newest_checkpoint(run_dir / "checkpoints"), crafted)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "epoch": 0, "scheduler": _RunsCode(marker)}, crafted / "train_state.pt")
    proc = _train(tmp_path, data, "victim", "--resume", str(crafted), **{"train.max_steps": 4})
    _one_message(proc, f"{crafted / 'train_state.pt'}: refused: unpickling it would import", "system")
    assert not marker.exists()
    refused = _train(tmp_path, data, "rc", "--resume", "auto", **{"train.max_steps": 4, "model.input_size": 96,
                                                                 "model.variant": "xception", "run.seed": 7})
    _one_message(refused, "cannot change on resume", "model.input_size: 64 (checkpoint) -> 96 (now)",
                 "model.variant: 'fakediffer' (checkpoint) -> 'xception' (now)", "run.seed: 42 (checkpoint) -> 7 (now)")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["input_size"] == 64  # untouched

    ok = _train(tmp_path, data, "rc", "--resume", "auto",
                **{"train.max_steps": 4, "optim.lr": 1e-3, "optim.weight_decay": 0.0, "checkpoint.every_steps": 1,
                   "data.test": {"extra": str(data / "test")}})
    assert ok.returncode == 0, U.explain(ok)
    assert "resumed with config changes (they take effect now): " in ok.stdout
    for change in ("optim.lr 0.0005 -> 0.001", "train.max_steps 2 -> 4", "checkpoint.every_steps 0 -> 1"):
        assert change in ok.stdout, ok.stdout[-3000:]
    entry = json.loads((run_dir / "config_changes.jsonl").read_text().splitlines()[-1])
    assert entry["step"] == 2 and entry["changed"]["optim.lr"] == {"old": 0.0005, "new": 0.001}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.001  # what runs now
    names = [p.name for _, p in ck.list_checkpoints(run_dir / "checkpoints")]
    assert names[-2:] == ["step-00000003", "step-00000004"]  # the new cadence: every step
    state = torch.load(run_dir / "checkpoints" / "step-00000004" / "train_state.pt", weights_only=True)
    assert all(g["weight_decay"] == 0.0 for g in state["optimizer"]["param_groups"])
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)  # constant schedule, past warmup
    assert "extra" in U.metrics(run_dir)["test"]
