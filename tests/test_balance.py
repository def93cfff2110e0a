"""data.balance on both loader backends: subsample_fakes (once, seeded, without replacement, the
released code's Celeb-DF/WildDeepfake balance) and weighted (each epoch resampled so that a draw is
real or fake with probability 1/2); the same selection on every rank, resume mid-epoch exact.

The split is 48 samples, 1 real in 4 (12 real, 36 fake), in 4 shards.
"""
from __future__ import annotations

import pytest

from fdtrain.data import DataError, build_loader
from tests._data_utils import make_shards, small_cfg

BACKENDS = ["dali", "torch"]


@pytest.fixture(scope="module")
def split(shard_maker):
    return shard_maker(48, 4, seed=7, real_every=4)


def _label(key: str) -> int:
    return int(int(key.rsplit("/", 2)[1].split("_")[0]) * 4 + int(key[-4:]) // 10) % 4 != 0


def _cfg(split, backend, balance, seed=3, **kw):
    cfg = small_cfg(split, backend=backend, balance=balance, noise_std=0.0, **kw)
    cfg.run.seed = seed
    return cfg


def _selected_keys(loader):
    """(key, label) of every sample of the loader's current selection, read from its index files."""
    from fdtrain.data.format import sample_key

    out = []
    for idx in loader.shards.indexes:
        for line in open(idx).read().splitlines()[1:]:
            out.append(sample_key(line.split()[3]))
    return out


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(k, int(v)) for b in loader for k, v in zip(b["key"], b["label"].tolist())]


@pytest.mark.parametrize("backend", BACKENDS)
def test_subsample_fakes_keeps_every_real_and_as_many_distinct_fakes(split, backend):
    loaders = [build_loader(_cfg(split, backend, "subsample_fakes"), "train", rank=r, world_size=2) for r in (0, 1)]
    keys = _selected_keys(loaders[0])
    assert keys == _selected_keys(loaders[1])  # one selection, the same on every rank
    labels = [_label(k) for k in keys]
    assert (labels.count(0), labels.count(1)) == (12, 12) and len(set(keys)) == 24  # without replacement
    assert loaders[0].num_samples == 24 and len(loaders[0]) == 24 // (2 * 4)
    again = build_loader(_cfg(split, backend, "subsample_fakes"), "train")
    other = build_loader(_cfg(split, backend, "subsample_fakes", seed=4), "train")
    assert _selected_keys(again) == keys and _selected_keys(other) != keys  # deterministic for the seed
    for rank, loader in enumerate(loaders):  # what the ranks train on comes from the selection only
        seen = _epoch(loader, 0)
        assert {k for k, _ in seen} <= set(keys), rank
        assert all(v == _label(k) for k, v in seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_gives_an_even_expected_share_on_one_and_two_ranks(split, backend):
    plain = build_loader(_cfg(split, backend, "none"), "train")
    unbalanced = [v for e in range(2) for _, v in _epoch(plain, e)]
    assert sum(unbalanced) / len(unbalanced) > 0.65  # 3 fakes in 4 without balancing
    for world in (1, 2):
        loaders = [build_loader(_cfg(split, backend, "weighted"), "train", rank=r, world_size=world)
                   for r in range(world)]
        labels = [v for e in range(6) for ld in loaders for _, v in _epoch(ld, e)]
        assert len(labels) == 6 * 48 // 4 * 4  # the epoch length does not change
        share = sum(labels) / len(labels)
        assert abs(share - 0.5) < 0.1, (world, share)  # 288 draws: 3.4 standard deviations
    one, two = (build_loader(_cfg(split, backend, "weighted"), "train").balance for _ in range(2))
    a, b = ([open(i).read() for i in bal.shards(0).indexes] for bal in (one, two))
    assert a == b and a != [open(i).read() for i in one.shards(1).indexes]  # per (seed, epoch); new each epoch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("balance", ["subsample_fakes", "weighted"])
def test_resume_mid_epoch_keeps_the_sequence(split, backend, balance):
    full = build_loader(_cfg(split, backend, balance), "train")
    want = _epoch(full, 1)
    first = build_loader(_cfg(split, backend, balance), "train")
    first.set_epoch(1)
    it = iter(first)
    head = [(k, int(v)) for _ in range(2) for b in [next(it)] for k, v in zip(b["key"], b["label"].tolist())]
    state = first.state_dict()
    it.close()
    resumed = build_loader(_cfg(split, backend, balance), "train")
    resumed.load_state_dict(state)
    tail = [(k, int(v)) for b in resumed for k, v in zip(b["key"], b["label"].tolist())]
    assert head + tail == want


def test_balancing_a_split_with_one_class_is_refused(tmp_path):
    reals = make_shards(tmp_path / "train", 8, 2, real_every=1)
    with pytest.raises(DataError, match="data.balance=weighted.*8 real and 0 fake"):
        build_loader(_cfg(reals, "torch", "weighted"), "train")
