"""Which samples an epoch reads and in which order: the seeds of every random choice, and data.balance.

``mix_seed`` makes every seed of the loaders (shard order, shuffle buffer, flips, noise, balance) a
function of (seed, epoch, rank, ...) only, so a resumed run replays them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from fdtrain.data.format import DataError, ShardSet, line_key, parse_index_line, parse_label, read_index, write_index


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, step, ...), stable across runs and processes."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------
# Class balance (data.balance): the selection is made on the index files, so both backends read it
# --------------------------------------------------------------------------------------------
class Balance:
    """Which training samples an epoch reads, written as DALI index files over the same tars.

    ``subsample_fakes`` (the released code for Celeb-DF and WildDeepfake): every real, and as many
    fakes as reals drawn once without replacement with ``run.seed``: one selection for the whole run.
    ``weighted``: each epoch draws as many samples as the split holds, with replacement, each draw
    real or fake with probability 1/2 then uniform within its class, seeded by (seed, epoch).
    Both are pure functions of the seed (and epoch), the same on every rank, so resume replays them.
    Labels come from each sample's ``cls`` member, read at the offset its index line gives.
    """

    def __init__(self, shards: ShardSet, policy: str, seed: int):
        self.full, self.policy, self.seed = shards, policy, seed
        self.lines = [read_index(i) for i in shards.indexes]
        labels = [_labels_of(str(t), lines) for t, lines in zip(shards.tars, self.lines)]
        self.tar_of = np.concatenate([np.full(len(v), i) for i, v in enumerate(labels)])  # (N,)
        self.line_of = np.concatenate([np.arange(len(v)) for v in labels])  # (N,)
        self.is_fake = np.concatenate(labels).astype(bool)  # (N,)
        self.n_real, self.n_fake = int((~self.is_fake).sum()), int(self.is_fake.sum())
        if min(self.n_real, self.n_fake) == 0:
            raise DataError(f"data.balance={policy}: the training split {shards.root} holds {self.n_real} real and "
                            f"{self.n_fake} fake samples; balancing needs both")
        self._tmp = tempfile.TemporaryDirectory(prefix="fdtrain-balance-")
        self._cache: dict[int, tuple[ShardSet, int]] = {}  # epoch -> (shards, reals); weighted only
        self.fixed = self._subsample() if policy == "subsample_fakes" else None

    def _subsample(self) -> tuple[ShardSet, int]:
        fakes = np.flatnonzero(self.is_fake)
        keep = fakes
        if len(fakes) > self.n_real:
            rng = np.random.default_rng(mix_seed(self.seed, 0xBA1A))
            keep = np.sort(rng.choice(fakes, size=self.n_real, replace=False))
        picked = np.sort(np.concatenate([np.flatnonzero(~self.is_fake), keep]))
        return self._write(picked, "subsample")

    def shards(self, epoch: int) -> ShardSet:
        """The shards an epoch reads (subsample_fakes: the same every epoch)."""
        return self._selection(epoch)[0]

    def share(self, epoch: int) -> tuple[int, int]:
        """(real, fake) samples the epoch's selection holds."""
        sel, real = self._selection(epoch)
        return real, sel.num_samples - real

    def _selection(self, epoch: int) -> tuple[ShardSet, int]:
        if self.fixed is not None:
            return self.fixed
        if epoch not in self._cache:
            rng = np.random.default_rng(mix_seed(self.seed, epoch, 0xBA1B))
            n = len(self.is_fake)
            fake_draw = rng.random(n) < 0.5
            reals, fakes = np.flatnonzero(~self.is_fake), np.flatnonzero(self.is_fake)
            picked = np.where(fake_draw, fakes[rng.integers(0, len(fakes), n)], reals[rng.integers(0, len(reals), n)])
            for old in [e for e in self._cache if e < epoch - 1]:  # keep this epoch's and the previous files
                for idx in self._cache.pop(old)[0].indexes:
                    Path(idx).unlink(missing_ok=True)
            self._cache[epoch] = self._write(picked, f"e{epoch}")
        return self._cache[epoch]

    def _write(self, picked: np.ndarray, tag: str) -> tuple[ShardSet, int]:
        """Index files holding the picked samples (global sample numbers; repeats allowed), tar by tar."""
        tars, indexes, counts, real = [], [], [], 0
        for i in range(self.full.num_shards):
            mine = picked[self.tar_of[picked] == i]
            if not len(mine):
                continue
            out = Path(self._tmp.name) / f"{tag}-{i:06d}.idx"
            body = [self.lines[i][j] for j in self.line_of[mine]]
            write_index(out, body)
            tars.append(self.full.tars[i])
            indexes.append(out)
            counts.append(len(body))
            real += int((~self.is_fake[mine]).sum())
        return ShardSet(split=self.full.split, root=self.full.root, tars=tars, indexes=indexes, counts=counts), real


def _labels_of(tar: str, lines: list[str]) -> np.ndarray:
    """0/1 label of each sample of a tar, from the ``cls`` member its index line points at."""
    out = np.zeros(len(lines), dtype=np.uint8)
    with open(tar, "rb") as fh:
        for j, line in enumerate(lines):
            cls = next(((offset, size) for ext, offset, size, _ in parse_index_line(line) if ext == "cls"), None)
            key = line_key(line)
            if cls is None:
                raise DataError(f"shard {tar}, key {key}: no cls member (data.balance needs each sample's label)")
            fh.seek(cls[0])
            out[j] = int(parse_label(fh.read(cls[1]), key, tar))
    return out
