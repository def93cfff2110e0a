"""Loaders on small real shards: DALI CPU vs the PyTorch fallback, augmentation, ranks, resume.

Images are 80-px JPEGs read at a 64-px model input, so both resize paths run.
"""
from __future__ import annotations

import logging

import pytest
import torch

from fdtrain.data import DataError, augment, build_loader
from fdtrain.data.loading import build as build_mod
from tests._data_utils import make_shards, sample_keys, small_cfg

BACKENDS = ["dali", "torch"]
# DALI and the fallback decode JPEG with the same libjpeg-turbo (identical pixels: checked at 64->64)
# but their antialiased linear resizers round differently: at most 1 grey level apart.
GREY = 1 / 127.5  # one grey level in normalized units


@pytest.fixture(scope="module")
def data(shard_maker):
    return {
        "train": shard_maker(64, 5, seed=1, size=80),  # uneven shards: 13,13,13,13,12
        "val": shard_maker(37, 3, split="val", seed=2, size=80),  # odd: padding on 2 ranks
    }


def _eval_images(cfg, backend, **kw):
    cfg.data.backend = backend
    return {k: (x, y) for b in build_loader(cfg, "val", **kw) for k, x, y in zip(b["key"], b["x"], b["label"])}


def test_dali_and_fallback_agree_in_eval(data):
    cfg = small_cfg(data["train"], data["val"])
    dali, fallback = _eval_images(cfg, "dali"), _eval_images(cfg, "torch")
    assert list(dali) == list(fallback) == sample_keys(37)  # one rank, no workers: same order too
    for i, k in enumerate(dali):
        assert dali[k][1] == fallback[k][1] == i % 2  # the writer's cls "0"/"1" alternates
        diff = (dali[k][0] - fallback[k][0]).abs()
        assert diff.max() <= 1.01 * GREY, k
        assert diff.mean() <= 0.5 * GREY, k
    assert {x.shape for x, _ in dali.values()} == {(3, 64, 64)}
    assert min(x.min() for x, _ in dali.values()) >= -1 and max(x.max() for x, _ in dali.values()) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_flip_rate_and_gated_noise_eval_clean(data, backend):
    cfg = small_cfg(data["train"], data["train"], backend=backend, batch_size=8, noise_p=0.5, noise_std=0.1)
    clean = {k: x for k, (x, _) in _eval_images(cfg, backend).items()}  # eval of the same shards
    loader = build_loader(cfg, "train")
    flips = gated = n = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for step, b in enumerate(loader):
            assert set(b) == {"x", "x_noisy", "label", "rows", "key"}
            # both backends hand X to the one shared noise function, seeded per (seed, epoch, rank, step)
            again = augment.add_gated_noise(b["x"], 0.5, 0.1, loader.noise_generator(epoch, step))
            assert torch.equal(again, b["x_noisy"])
            for k, x, xn in zip(b["key"], b["x"], b["x_noisy"]):
                n += 1
                ref = clean[k]
                flipped = (x - ref.flip(-1)).abs().mean() < (x - ref).abs().mean()
                flips += int(flipped)
                assert (x - (ref.flip(-1) if flipped else ref)).abs().max() <= 1.01 * GREY  # flip, nothing else
                d = xn - x
                if d.abs().max() == 0:
                    continue
                gated += 1
                inner = x.abs() < 0.6  # 4 std from the clip bounds: the noise is never clipped there
                assert abs(d[inner].std().item() - 0.1) < 0.01
                assert abs(d[inner].mean().item()) < 0.01
                assert xn.min() >= -1 and xn.max() <= 1
    assert n == 3 * 64 // 8 * 8
    assert abs(flips / n - 0.5) < 0.12, flips / n
    assert abs(gated / n - 0.5) < 0.12, gated / n


@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_noise_exact_and_deterministic(channels_last):
    """X~ = clip(X + std * N) on the gated rows only, each row's N drawn in turn from the generator after
    the gate; X itself untouched; the paper's std 1e-6 still moves pixels (it is not skipped)."""
    x = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 0.5])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    for std in (1e-6, 0.5):
        out = augment.add_gated_noise(x, 0.5, std, torch.Generator().manual_seed(7))
        assert torch.equal(out, augment.add_gated_noise(x, 0.5, std, torch.Generator().manual_seed(7)))
        assert torch.equal(x, before) and out.stride() == x.stride()
        g = torch.Generator().manual_seed(7)
        gate = torch.rand(8, generator=g) < 0.5
        assert 0 < gate.sum() < 8  # this seed gates some rows and not others
        noise = torch.stack([torch.randn((3, 24, 24), generator=g) for _ in range(int(gate.sum()))])  # row by row
        assert torch.equal(out[gate], (x[gate] + noise * std).clamp(-1, 1))
        assert torch.equal(out[~gate], x[~gate])
    tiny = augment.add_gated_noise(x, 1.0, 1e-6, torch.Generator().manual_seed(1))
    moved = (tiny - x).abs()
    assert (moved > 0).float().mean() > 0.9 and moved.max() < 1e-5
    assert augment.add_gated_noise(x, 0.0, 0.5, torch.Generator()) is x  # nothing gated: no copy


def test_buffer_pool_reuses_only_unreferenced_buffers():
    pool = augment.BufferPool(size=2)
    x = torch.zeros(2, 3, 8, 8)
    a = pool.empty_like(x)
    a_ptr = a.data_ptr()
    view = a[1]  # a view alone keeps the buffer taken
    del a
    b = pool.empty_like(x)
    assert b.data_ptr() != a_ptr
    del view
    c = pool.empty_like(x)
    assert c.data_ptr() == a_ptr  # nothing sees it any more: handed out again
    d = pool.empty_like(x)  # pool full and both taken: a fresh, unpooled buffer
    assert len({b.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3
    assert pool.empty_like(x.to(torch.bfloat16)).dtype == torch.bfloat16  # not pooled, still right
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):  # DALI hands out channels_last
        assert pool.empty_like(layout).stride() == layout.stride()
        noisy = augment.add_gated_noise(layout, 0.5, 0.5, torch.Generator().manual_seed(0), pool)
        assert torch.equal(noisy, augment.add_gated_noise(x, 0.5, 0.5, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_output_is_unflipped_and_noiseless(data, backend):
    cfg = small_cfg(data["train"], data["val"], flip_p=1.0, noise_p=1.0, noise_std=0.5)
    cfg.data.backend = backend
    batches = list(build_loader(cfg, "val"))
    assert all(set(b) == {"x", "label", "key"} for b in batches)
    ref = _pil_reference(data["val"], sample_keys(37)[5])
    x = next(x for b in batches for k, x in zip(b["key"], b["x"]) if k == sample_keys(37)[5])
    assert (x - ref).abs().mean() < 2 * GREY < (x - ref.flip(-1)).abs().mean()


def _pil_reference(folder, key):
    """The sample decoded by PIL and resized with its BILINEAR (antialiased) filter: no flip, no noise."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False, empty_check=False):
        if s["__key__"] == key:
            img = Image.open(io.BytesIO(s["jpg"])).convert("RGB").resize((64, 64), Image.BILINEAR)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    raise KeyError(key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_train_steps_and_eval_every_key_once(data, backend):
    cfg = small_cfg(data["train"], data["val"], backend=backend, batch_size=4)
    steps, keys = [], []
    for rank in range(2):
        loader = build_loader(cfg, "train", rank=rank, world_size=2)
        batches = list(loader)
        steps.append((len(loader), len(batches)))
        keys.append({k for b in batches for k in b["key"]})
    assert steps == [(8, 8), (8, 8)]  # 64 // (2 x 4), whatever each rank's shards hold
    assert not keys[0] & keys[1]  # the ranks read disjoint samples
    seen = [k for rank in range(2) for b in build_loader(cfg, "val", rank=rank, world_size=2) for k in b["key"]]
    assert sorted(seen) == sorted(sample_keys(37))  # 18 + 19 samples: padding never reaches the output


@pytest.mark.parametrize("backend,workers", [("dali", 0), ("torch", 2)])
def test_resume_continues_with_the_same_batches(data, backend, workers, caplog):
    cfg = small_cfg(data["train"], backend=backend, num_workers=workers, shuffle_buffer=8)
    first = build_loader(cfg, "train", world_size=2, rank=1)
    epoch0 = [(b["key"], b["x"], b["x_noisy"]) for b in first]
    assert first.state_dict()["epoch"] == 1 and first.state_dict()["step_in_epoch"] == 0
    epoch1 = [b["key"] for b in first]
    assert epoch1 != [k for k, _, _ in epoch0]  # reshuffled per epoch (seed + epoch)

    again = build_loader(cfg, "train", world_size=2, rank=1)
    it = iter(again)
    for _ in range(3):
        next(it)
    sd = again.state_dict()
    assert sd["epoch"] == 0 and sd["step_in_epoch"] == 3
    it.close()  # a pre-empted run: the process ends here

    resumed = build_loader(cfg, "train", world_size=2, rank=1)
    resumed.load_state_dict(sd)
    with caplog.at_level(logging.INFO, logger="fdtrain.data"):
        rest = [(b["key"], b["x"], b["x_noisy"]) for b in resumed]
    assert len(rest) == len(epoch0) - 3
    if backend == "dali":  # DALI's own checkpoint of the reader: the consumed batches are not decoded again
        assert isinstance(sd["dali_checkpoint"], bytes)
        assert "restored from its checkpoint at step 3" in caplog.text and "replays" not in caplog.text
    for (k0, x0, n0), (k1, x1, n1) in zip(epoch0[3:], rest):
        assert k0 == k1
        assert torch.equal(x0, x1) and torch.equal(n0, n1)


def test_backend_choice_is_logged_and_fallback_is_automatic(data, monkeypatch, caplog):
    cfg = small_cfg(data["train"], data["val"])
    with caplog.at_level(logging.INFO, logger="fdtrain.data"):
        assert build_loader(cfg, "val").backend == "dali"
        monkeypatch.setattr(build_mod, "dali_available", lambda: False)
        assert build_loader(cfg, "val").backend == "torch"
    lines = [r.getMessage() for r in caplog.records if "backend=" in r.getMessage()]
    assert len(lines) == 2 and "DALI is not installed: PyTorch fallback" in lines[1]
    cfg.data.backend = "dali"
    with pytest.raises(DataError, match="data.backend=dali but nvidia.dali is not importable"):
        build_loader(cfg, "val")


@pytest.mark.parametrize("backend", BACKENDS)
def test_png_samples_and_dtype(tmp_path, backend):
    folder = make_shards(tmp_path / "png", 6, 2, split="val", image_ext="png")
    cfg = small_cfg(val=folder, backend=backend)
    b = next(iter(build_loader(cfg, "val", dtype=torch.bfloat16)))
    assert b["x"].dtype == torch.bfloat16 and b["x"].shape == (4, 3, 64, 64) and b["label"].dtype == torch.float32


def test_tar_pattern_without_manifest(data):
    pattern = str(data["val"] / "shard-{000000..000001}.tar")  # 2 of the 3 shards: 13 + 12 samples
    for backend in BACKENDS:
        cfg = small_cfg(data["train"], backend=backend)
        loader = build_loader(cfg, "val", path=pattern)
        assert loader.num_samples == 25 and len([k for b in loader for k in b["key"]]) == 25


def _shard_of(key: str, counts=(13, 13, 13, 13, 12)) -> int:
    k = sample_keys(64).index(key)
    return next(i for i in range(len(counts)) if k < sum(counts[: i + 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_epoch_reads_the_shards_in_a_new_order_and_ranks_flip_differently(data, backend):
    """Shuffle buffer 1, so the stream shows the shard order: it changes from epoch to epoch (one
    rank); on two ranks the epochs stay disjoint, and the flip decisions by batch position differ."""
    cfg = small_cfg(data["train"], data["train"], backend=backend, batch_size=4, shuffle_buffer=1, flip_p=0.5)
    loader = build_loader(cfg, "train")
    orders = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        shards = [_shard_of(k) for b in loader for k in b["key"]]
        orders.append(list(dict.fromkeys(shards)))  # shards in the order they were read
    assert all(sorted(o) == [0, 1, 2, 3, 4] for o in orders)
    assert len({tuple(o) for o in orders}) >= 3, orders  # 5 shards: two epochs may draw the same order

    clean = {k: x for k, (x, _) in _eval_images(cfg, backend).items()}
    flips, keys = [], []
    for rank in range(2):
        ld = build_loader(cfg, "train", rank=rank, world_size=2)
        ld.set_epoch(1)
        batches = list(ld)
        keys.append({k for b in batches for k in b["key"]})
        flips.append([bool((x - clean[k].flip(-1)).abs().mean() < (x - clean[k]).abs().mean())
                      for b in batches for k, x in zip(b["key"], b["x"])])
    assert not keys[0] & keys[1]  # the same shard permutation on both ranks: disjoint halves
    assert len(flips[0]) == len(flips[1]) == 32 and flips[0] != flips[1]
    assert 8 <= sum(flips[0]) <= 24 and 8 <= sum(flips[1]) <= 24
