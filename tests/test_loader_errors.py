"""Bad input reaches the user as a clear error (or a counted skip), before training or at the sample."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fdtrain.data import DataError, build_loader
from tests._data_utils import make_shards, sample_keys, small_cfg

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.timeout(120)  # "never a hang"


@pytest.fixture(scope="module")
def corrupt(shard_maker):
    """12 samples in 2 shards; sample 8 (shard 1) is a truncated JPEG, sample 3 (shard 0) not an image."""
    return shard_maker(12, 2, split="val", corrupt={8: "truncated", 3: "garbage"})


def _keys(loader):
    return [k for b in loader for k in b["key"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["garbage", "truncated"])
def test_corrupt_jpeg_names_shard_and_key(shard_maker, backend, which):
    n = 3 if which == "garbage" else 8
    folder = shard_maker(12, 2, split="val", corrupt={n: which})
    cfg = small_cfg(val=folder, backend=backend)
    shard = "shard-000000.tar" if n < 6 else "shard-000001.tar"
    with pytest.raises(DataError, match=rf"undecodable image in shard \S*{shard}, key {sample_keys(12)[n]}"):
        _keys(build_loader(cfg, "val"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_in_training_names_it(corrupt, backend):
    cfg = small_cfg(train=corrupt, backend=backend, batch_size=2)
    with pytest.raises(DataError, match=r"undecodable image in shard \S*shard-00000[01].tar, key ffpp/\S+/00[23]0"):
        for epoch in range(2):
            cfg.run.seed = epoch
            _keys(build_loader(cfg, "train"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_corrupt_skip_counts_and_keeps_the_rest(corrupt, backend):
    cfg = small_cfg(train=corrupt, val=corrupt, backend=backend, on_corrupt="skip", batch_size=2)
    bad = {sample_keys(12)[3], sample_keys(12)[8]}
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, "val", rank=rank, world_size=2)
        seen += _keys(loader)
        assert set(loader.skipped) <= bad and all("shard-00000" in v for v in loader.skipped.values())
    assert sorted(seen) == sorted(set(sample_keys(12)) - bad)  # every good sample exactly once
    train = build_loader(cfg, "train")
    keys = _keys(train)
    assert len(keys) == len(train) * 2 == 12 and not bad & set(keys)  # a full epoch: same number of steps
    assert set(train.skipped) == bad and train.state_dict()["skipped"].keys() == bad


def test_missing_index_is_built_with_a_warning_or_refused(tmp_path):
    folder = make_shards(tmp_path / "val", 6, 2, split="val", index=False)
    cfg = small_cfg(val=folder, backend="dali", missing_index="error")
    with pytest.raises(DataError, match=r"shard-000000.tar: no DALI index shard-000000.idx .*wds2idx"):
        build_loader(cfg, "val")
    cfg.data.missing_index = "build"
    with pytest.warns(UserWarning, match="no DALI index; built"):
        loader = build_loader(cfg, "val")
    assert (folder / "shard-000001.idx").is_file()
    assert sorted(_keys(loader)) == sorted(sample_keys(6))
    cfg.data.backend = "torch"  # the fallback does not need the index at all
    (folder / "shard-000000.idx").unlink()
    assert sorted(_keys(build_loader(cfg, "val"))) == sorted(sample_keys(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_index_is_refused(tmp_path, backend):
    folder = make_shards(tmp_path / "val", 6, 2, split="val")
    make_shards(tmp_path / "other", 4, 2, split="val")
    (folder / "shard-000001.idx").write_text((tmp_path / "other" / "shard-000001.idx").read_text())
    with pytest.raises(DataError, match=r"shard-000001.tar: its index lists 2 samples but manifest.json says 3"):
        build_loader(small_cfg(val=folder, backend=backend), "val")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_or_stale_shard_is_named_at_start(tmp_path, backend):
    """The shard's size against the one `fdtrain shards make` recorded, before any sample is read."""
    folder = make_shards(tmp_path / "val", 16, 2, by_video=True)
    tar = folder / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(DataError, match=rf"{tar}: truncated shard: {len(data) // 2} bytes on disk but manifest.json "
                                        rf"recorded {len(data)} \(an incomplete copy or write\?\)"):
        build_loader(small_cfg(val=folder, backend=backend), "val")
    tar.write_bytes(data + bytes(512))
    with pytest.raises(DataError, match=rf"{tar}: stale shard: {len(data) + 512} bytes on disk"):
        build_loader(small_cfg(val=folder, backend=backend), "val")


def test_index_that_does_not_match_its_tar_is_caught_by_the_fallback(tmp_path):
    folder = make_shards(tmp_path / "val", 6, 2, split="val")
    (folder / "shard-000001.idx").write_text((folder / "shard-000000.idx").read_text())  # same count, wrong tar
    with pytest.raises(DataError, match=r"shard-000001.tar: member \S+ is not where \S+shard-000001.idx says"):
        _keys(build_loader(small_cfg(val=folder, backend="torch"), "val"))


def test_refused_before_training(tmp_path):
    folder = make_shards(tmp_path / "train", 16, 3)
    cfg = small_cfg(train=folder, backend="torch", num_workers=2)
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\) \(data.num_workers\)"):
        build_loader(cfg, "train", world_size=2)
    cfg.data.backend = "dali"  # DALI splits by sample: 3 shards serve 2 ranks
    assert len(build_loader(cfg, "train", world_size=2)) == 2
    with pytest.raises(DataError, match=r"16 samples cannot fill one step of 5 rank\(s\) x data.batch_size=4"):
        build_loader(cfg, "train", world_size=5, rank=4)
    cfg.data.train = str(tmp_path / "nope")
    with pytest.raises(DataError, match=r"data.train=\S*nope: no such folder"):
        build_loader(cfg, "train")
    cfg.data.train = ""
    with pytest.raises(DataError, match=r"data.train is empty"):
        build_loader(cfg, "train")
    with pytest.raises(DataError, match=r"unknown split 'tset'"):
        build_loader(cfg, "tset")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"split": "val", "num_samples": 0, "num_shards": 0, "shards": []}))
    with pytest.raises(DataError, match=r"the 'val' split is empty"):
        build_loader(cfg, "val", path=str(empty))
    (folder / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match=r"missing: \S*shard-000002.tar"):
        build_loader(cfg, "val", path=str(folder))


def _label_7(sample):
    return dataclasses.replace(sample, label=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_label_names_the_key(shard_maker, backend):
    folder = shard_maker(1, 1, split="val", corrupt={0: _label_7})
    with pytest.raises(DataError, match=rf"key {sample_keys(1)[0]}: cls must be '0' or '1', got b'7'"):
        _keys(build_loader(small_cfg(val=folder, backend=backend), "val"))
