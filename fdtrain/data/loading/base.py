"""The ``Loader`` base class: the contract shared by the DALI backend and the PyTorch fallback.

``build_loader(cfg, split, rank=, world_size=, device=, path=, dtype=) -> Loader``

* ``split == "train"``: each epoch reads the shards in an order permuted by (seed, epoch), the
  same on every rank (so the ranks' parts stay disjoint), through a shuffle buffer; shuffle, flips
  (``data.flip_p``) and noise are seeded by (seed, epoch, rank); batches
  ``{"x", "x_noisy", "label", "rows", "key"}`` (plus ``"x_noisy2"``, a second independent draw of
  X~, when ``model.forward=two_pass``; ``rows``: ``augment.class_rows``, each class's row indices
  made from the host's labels); ``len(loader)`` steps per epoch,
  ``num_samples // (world_size * batch_size)``, the same on every rank.
* any other split (``"val"``, a name in ``data.test``, or any folder given as ``path``): read in
  order, no flip, no noise; every sample exactly once across ranks, padding removed, batches
  ``{"x", "label", "key"}`` (the last one may be smaller).

``x`` and ``x_noisy`` are ``(B, 3, S, S)`` in ``dtype`` on ``device`` with S = ``model.input_size``
and pixels ``(v / 255 - 0.5) / 0.5``; ``label`` is float32 0/1; ``key`` the samples' keys.
A loader saves its position (``state_dict``: epoch, step in epoch, skipped samples) and resumes
with the exact same order. Everything that can be refused (no such folder, empty split, stale or
missing index, too few shards for ranks x workers) is refused here, before training starts.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from fdtrain.data.augment import BufferPool, add_gated_noise, class_rows, normalize_uint8
from fdtrain.data.format import DataError, ShardSet
from fdtrain.data.loading.sampling import Balance, mix_seed

log = logging.getLogger("fdtrain.data")


class Loader:
    """One split for one rank; backends implement ``_batches`` and ``_eval_steps``."""

    backend = "?"

    def __init__(self, cfg: Any, shards: ShardSet, *, train: bool, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.cfg, self.shards, self.train = cfg, shards, train
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype
        self.batch_size = cfg.data.batch_size if train else cfg.data.eval_batch_size
        self.size = cfg.model.input_size
        self.seed = cfg.run.seed
        self.epoch = 0
        self.step_in_epoch = 0
        self.skipped: dict[str, str] = {}  # key -> "shard: reason", with data.on_corrupt=skip
        self.buffers = BufferPool()  # X and X~ of CPU batches
        self.balance: Balance | None = None  # data.balance: set by build_loader (training)
        self.num_samples = shards.num_samples
        if train:
            self.steps_per_epoch = self.num_samples // (world_size * self.batch_size)
        else:
            self.steps_per_epoch = self._eval_steps()

    # --- contract ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; setting the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.step_in_epoch = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "backend": self.backend,
                "seed": self.seed, "world_size": self.world_size, "skipped": dict(self.skipped)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("world_size", self.world_size) != self.world_size:
            log.warning("data: resuming with %d ranks instead of %d: the sample order will differ",
                        self.world_size, sd["world_size"])
        self.epoch, self.step_in_epoch = int(sd["epoch"]), int(sd["step_in_epoch"])
        self.skipped.update(sd.get("skipped", {}))
        if self.train and self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch (the rest of it after ``load_state_dict``); then the epoch counter moves on."""
        epoch, skip = self.epoch, (self.step_in_epoch if self.train else 0)
        if skip:
            log.info("data[%s]: resuming epoch %d at step %d/%d", self.shards.split, epoch, skip, self.steps_per_epoch)
        want = self.steps_per_epoch - skip if self.train else None
        got = 0
        with contextlib.closing(self._batches(epoch, skip)) as batches:  # stops workers/pipelines on early exit
            for raw in batches:
                if want is not None and got == want:
                    break
                step = skip + got
                out = self._finish(raw, epoch, step)
                got += 1
                if self.train:
                    self.step_in_epoch = step + 1  # counted when handed out: a checkpoint after it skips it
                yield out
        if want is not None and got != want:  # a short rank would hang the others at the next all-reduce
            raise DataError(f"data[{self.shards.split}] rank {self.rank}: epoch {epoch} ended after {skip + got} "
                            f"of {self.steps_per_epoch} steps ({self.backend} backend)")
        if self.train:
            self.epoch, self.step_in_epoch = epoch + 1, 0

    # --- shared post-processing ---------------------------------------------------------------
    def _finish(self, raw: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
        """Move to the device, normalize uint8 input, cast, and add X~ in training."""
        x = raw["x"].to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize_uint8(x, self.buffers)
        x = x.to(self.dtype)
        out = {"x": x, "label": raw["label"].to(self.device, non_blocking=True), "key": raw["key"]}
        if self.train:
            out["rows"] = class_rows(raw["label"], self.device)  # from the host's labels: no device sync
            # model.forward=two_pass runs the encoder twice per step, each on its own draw of X~ (as
            # the released code draws the noise inside each forward): "x_noisy2" is the second.
            views = ("x_noisy", "x_noisy2")[:self.cfg.model.noisy_views]
            for v, name in enumerate(views):
                out[name] = add_gated_noise(x, self.cfg.data.noise_p, self.cfg.data.noise_std,
                                            self.noise_generator(epoch, step, v), self.buffers)
        return out

    def noise_generator(self, epoch: int, step: int, view: int = 0) -> torch.Generator:
        """The generator of X~ for one batch: a function of (seed, epoch, rank, step, view) only."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(mix_seed(self.seed, epoch, self.rank, step, 0x4E01 + view))

    def _record_skip(self, key: str, shard: str, reason: str) -> None:
        if key not in self.skipped:
            self.skipped[key] = f"{shard}: {reason}"
            log.warning("data[%s]: skipped undecodable sample %s in %s (%s); %d skipped so far",
                        self.shards.split, key, shard, reason, len(self.skipped))

    def selected_shards(self, epoch: int) -> ShardSet:
        """The shards (and index files) epoch ``epoch`` reads: data.balance's selection, or all."""
        if self.balance is None:
            return self.shards
        shards = self.balance.shards(epoch)
        if getattr(self, "_balance_logged", None) != epoch:
            self._balance_logged = epoch
            real, fake = self.balance.share(epoch)
            log.info("data[%s] epoch %d: balance=%s selects %d real + %d fake samples (%.1f%% fake)", shards.split,
                     epoch, self.balance.policy, real, fake, 100.0 * fake / max(1, real + fake))
        if self.backend == "torch" and shards.num_shards < self.world_size * max(1, self.cfg.data.num_workers):
            raise DataError(f"data.balance={self.balance.policy}: epoch {epoch} selects samples from "
                            f"{shards.num_shards} shard(s), fewer than {self.world_size} rank(s) x data.num_workers "
                            "for the PyTorch fallback: write smaller shards, lower data.num_workers, or use DALI")
        return shards

    # --- backends -----------------------------------------------------------------------------
    def describe(self) -> str:
        """Backend settings for the one log line that announces the loader."""
        return ""

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def _eval_steps(self) -> int:
        lo, hi = self.shards.rank_range(self.rank, self.world_size)
        return math.ceil((hi - lo) / self.batch_size)
