"""Shard writer, DALI index, DALI read-back and `shards verify` on damaged shards."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fdtrain.data import format as sh
from fdtrain.data.prep.verify import verify
from tests._data_utils import crop_jpeg, read_split


def _jpeg(seed: int, size: int = 32) -> bytes:
    return crop_jpeg(np.random.default_rng(seed), size)


def _samples(n: int) -> list[sh.Sample]:
    out = []
    for i in range(n):
        video = f"ffpp/c23/Deepfakes/{i // 3:03d}_{i // 3 + 1:03d}" if i % 2 else f"ffpp/c23/original/{i // 3:03d}"
        key = sh.frame_key(video, i)
        meta = {"key": key, "dataset": "ffpp", "split": "train", "method": "Deepfakes" if i % 2 else "original",
                "compression": "c23", "video": video, "frame": i, "label": i % 2, "source": f"v{i}.mp4"}
        out.append(sh.Sample(key, _jpeg(i), "jpg", i % 2, meta))
    # a long key: the USTAR prefix field holds it, and the index must still be right
    long_video = "wdf/fake_train/" + "a" * 60 + "/" + "b" * 60
    out.append(sh.Sample(sh.frame_key(long_video, 3), _jpeg(99), "jpg", 1,
                         {"key": sh.frame_key(long_video, 3), "dataset": "wdf", "split": "train", "method": "fake",
                          "compression": "", "video": long_video, "frame": 3, "label": 1, "source": "x"}))
    return out


@pytest.fixture()
def written(tmp_path):
    samples = _samples(9)
    counts = sh.plan_shards(len(samples), 10**5, 256 << 20, min_shards=3)
    m = sh.write_split(samples, tmp_path / "train", counts, {"skipped": [], "command": "test"})
    return tmp_path / "train", samples, m


def test_plan_shards_balances_and_honours_minimum():
    assert sh.plan_shards(10, 100, 1000, 3) == [4, 3, 3]
    assert sh.plan_shards(2, 100, 1000, 8) == [1, 1]  # never an empty shard
    assert sh.plan_shards(100, 10_000, 1000, 1) == [10] * 10  # the size target decides
    assert sh.plan_shards(0, 0, 1000, 8) == []


def test_clean_component_has_no_dots_and_keeps_long_names_unique():
    assert sh.clean_component("id0_id16_0000.mp4") == "id0_id16_0000_mp4"
    a, b = sh.clean_component("x" * 100 + "1"), sh.clean_component("x" * 100 + "2")
    assert a != b and len(a) == 64 and "." not in a


def test_write_split_layout_manifest_and_samples(written):
    d, samples, m = written
    assert sorted(p.name for p in d.iterdir()) == [
        "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar",
        "shard-000002.idx", "shard-000002.tar"]
    assert m["num_samples"] == 10 and m["num_shards"] == 3
    assert m["counts"]["label"] == {"0": 5, "1": 5}
    assert json.loads((d / "manifest.json").read_text()) == m
    got = read_split(d)
    assert set(got) == {s.key for s in samples}
    for s in samples:
        g = got[s.key]
        assert g["image"] == s.image and g["cls"] == s.label and g["json"]["video"] == s.meta["video"]


def test_index_equals_wds2idx(written, tmp_path):
    """The writer's index, the one built for a tar without one (format.build_index) and wds2idx's agree."""
    d, _, _ = written
    for tar in sorted(d.glob("*.tar")):
        built = tmp_path / (tar.stem + ".built.idx")
        sh.build_index(tar, built)
        assert built.read_text() == sh.index_path(tar).read_text()
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    if not Path(wds2idx).exists():
        pytest.skip("DALI's wds2idx is not installed (pip install fdtrain[dali])")
    for tar in sorted(d.glob("*.tar")):
        ref = tmp_path / (tar.stem + ".ref.idx")
        subprocess.run([wds2idx, str(tar), str(ref)], check=True, capture_output=True)
        assert sh.index_path(tar).read_text() == ref.read_text()


def test_build_index_of_a_foreign_tar_matches_wds2idx(tmp_path):
    """A tar written by another tool (a directory entry, a dot file, GNU format) indexes as wds2idx
    indexes it; a member without an extension is left out; an empty or unreadable tar names itself."""
    def write(path: Path, members: list) -> Path:
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                else:
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        return path

    members = [("d/", None), ("d/a.jpg", b"x" * 700), ("d/a.cls", b"1"), ("d/.hidden", b"h"),
               ("d/b.jpg", b"y" * 10), ("d/b.cls", b"0")]
    tar = write(tmp_path / "foreign.tar", members)
    sh.build_index(tar, tmp_path / "foreign.idx")
    lines = sh.read_index(tmp_path / "foreign.idx")
    assert [sh.line_key(x) for x in lines] == ["d/a", "d/b"]
    assert [m[0] for m in sh.parse_index_line(lines[0])] == ["jpg", "cls"]
    with open(tar, "rb") as fh:
        assert sh.read_member(fh, sh.parse_index_line(lines[0])[0], str(tar), "foreign.idx") == b"x" * 700
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    if Path(wds2idx).exists() and shutil.which("tar"):
        subprocess.run([wds2idx, str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "foreign.idx").read_text() == (tmp_path / "ref.idx").read_text()
    odd = write(tmp_path / "odd.tar", [*members, ("README", b"r")])
    sh.build_index(odd, tmp_path / "odd.idx")
    assert sh.read_index(tmp_path / "odd.idx") == lines
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(sh.DataError, match="empty.tar: cannot index"):
        sh.build_index(empty, tmp_path / "empty.idx")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 1500)
    with pytest.raises(sh.DataError, match="junk.tar: cannot index"):
        sh.build_index(tmp_path / "junk.tar", tmp_path / "junk.idx")


def test_dali_reads_shards_with_index(synth_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    out = synth_shards
    for split in ("train", "test"):
        d = out / split
        m = json.loads((d / "manifest.json").read_text())
        tars = [str(d / s["name"]) for s in m["shards"]]
        idxs = [str(d / s["index"]) for s in m["shards"]]

        @pipeline_def(batch_size=4, num_threads=1, device_id=None)
        def pipe(tars=tars, idxs=idxs):
            img, cls, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls", "json"],
                                                   missing_component_behavior="error", name="r", pad_last_batch=True)
            return fn.decoders.image(img, device="cpu"), cls, meta

        p = pipe()
        p.build()
        assert p.epoch_size("r") == m["num_samples"]
        keys, labels = [], []
        for _ in range(-(-m["num_samples"] // 4)):
            imgs, cls, meta = p.run()
            for j in range(len(cls)):
                assert np.array(imgs[j]).shape == (64, 64, 3)
                js = json.loads(bytes(np.array(meta[j])))
                keys.append(js["key"])
                labels.append(int(bytes(np.array(cls[j]))))
                assert labels[-1] == js["label"]
        keys = keys[: m["num_samples"]]  # the padded last batch repeats the final sample
        assert len(set(keys)) == m["num_samples"]
        assert sum(labels[: m["num_samples"]]) == m["counts"]["label"]["1"]


def test_verify_accepts_intact_shards(written, capsys):
    assert verify(written[0]) == 0
    assert "ok, 10 samples in 3 shards" in capsys.readouterr().out


def _flip_byte_inside_jpeg(tar_path: Path) -> str:
    """Flip one byte in the middle of the first JPEG member; returns its name."""
    with tarfile.open(tar_path) as t:
        m = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(tar_path.read_bytes())
    pos = m.offset_data + m.size // 2
    data[pos] ^= 0x5A
    tar_path.write_bytes(bytes(data))
    return m.name


def test_verify_catches_flipped_jpeg_byte(written, capsys):
    d = written[0]
    name = _flip_byte_inside_jpeg(d / "shard-000001.tar")
    assert verify(d) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "shard-000001.tar: sha256 differs" in out
    assert f"{name[:-4]}: image bytes differ from their recorded sha256" in out


def test_verify_catches_truncated_tar(written, capsys):
    d = written[0]
    tar = d / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    assert verify(d) == 1
    out = capsys.readouterr().out
    assert "shard-000000.tar: unreadable tar" in out or "truncated" in out


def test_verify_catches_wrong_index_and_missing_shard(written, capsys):
    d = written[0]
    idx = d / "shard-000002.idx"
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    (d / "shard-000001.tar").unlink()
    assert verify(d) == 1
    out = capsys.readouterr().out
    assert "shard-000002.idx: does not match" in out and "shard-000001.tar: missing" in out


def test_verify_cli_exit_code_on_dataset_folder(synth_shards, tmp_path):
    out = shutil.copytree(synth_shards, tmp_path / "shards")
    from fdtrain.cli import main

    assert main(["shards", "verify", str(out)]) == 0
    tar = sorted((out / "val").glob("*.tar"))[0]
    _flip_byte_inside_jpeg(tar)
    assert main(["shards", "verify", str(out)]) == 1


def test_verify_sample_checks_read_like_the_loaders():
    """verify's per-sample rules are the format's: any image extension a loader reads, cls as parsed."""
    from fdtrain.data.prep.verify import _check_sample

    img = _jpeg(1)
    meta = {**{f: "x" for f in sh.SAMPLE_FIELDS}, "key": "v/0001", "video": "v", "label": 1,
            "image_sha256": hashlib.sha256(img).hexdigest()}
    ok = {"jpeg": img, "cls": b"1", "json": json.dumps(meta).encode()}
    assert _check_sample("v/0001", ok, decode=True) == []
    assert _check_sample("v/0001", {**ok, "cls": b"2"}, decode=True) == ["cls is b'2', want 0 or 1"]
    assert _check_sample("v/0001", {**ok, "cls": b"0"}, decode=True) == ["json label 1 differs from cls 0"]
    assert _check_sample("v/0001", {**ok, "png": img}, decode=False) == \
        ["want one image member (jpg/jpeg/png), got ['cls', 'jpeg', 'json', 'png']"]
