"""``build_loader``: check a split and the loader settings, pick the backend, build the loader.

The backends are imported here, when one is built (DALI is an optional dependency); they import the
``Loader`` base class from ``base``, never this module.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from fdtrain.data.format import DataError, open_shards, split_path
from fdtrain.data.loading.base import Loader
from fdtrain.data.loading.sampling import Balance

log = logging.getLogger("fdtrain.data")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why) for data.backend = auto | dali | torch."""
    if requested == "torch":
        return "torch", "data.backend=torch"
    if dali_available():
        return "dali", f"data.backend={requested}"
    if requested == "dali":
        raise DataError("data.backend=dali but nvidia.dali is not importable: "
                        "pip install 'fdtrain[dali]' or set data.backend=torch (or auto)")
    return "torch", "data.backend=auto and DALI is not installed: PyTorch fallback"


def build_loader(cfg: Any, split: str, *, rank: int = 0, world_size: int = 1, device: Any = None,
                 path: str | None = None, dtype: Any = None) -> Loader:
    """Check the split's shards and settings, pick the backend (one log line) and build the loader."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world_size {world_size}")
    d = cfg.data
    train = split == "train"
    backend, why = choose_backend(cfg.data.backend)
    location, field = split_path(cfg, split, path)
    balancing = train and d.balance != "none"
    shards = open_shards(location, split, field=field, need_index=backend == "dali" or balancing,
                         missing_index=cfg.data.missing_index)
    balance = Balance(shards, d.balance, cfg.run.seed) if balancing else None
    if balance is not None and balance.fixed is not None:
        shards = balance.fixed[0]  # subsample_fakes: the run's epochs all read this selection
        log.info("data[train]: balance=subsample_fakes keeps %d real and %d of %d fake samples (seed %d)",
                 balance.n_real, shards.num_samples - balance.n_real, balance.n_fake, cfg.run.seed)
    batch = cfg.data.batch_size if train else cfg.data.eval_batch_size
    if train and shards.num_samples < world_size * batch:
        raise DataError(f"{field}={location}: {shards.num_samples} samples cannot fill one step of "
                        f"{world_size} rank(s) x data.batch_size={batch}")
    if backend == "torch" and train:
        need = world_size * max(1, cfg.data.num_workers)
        if shards.num_shards < need:
            raise DataError(
                f"{field}={location}: {shards.num_shards} shard(s) for {world_size} rank(s) x "
                f"{max(1, cfg.data.num_workers)} worker(s) (data.num_workers): the PyTorch fallback splits whole "
                f"shards between ranks and workers, so it needs at least {need}; write smaller shards, lower "
                "data.num_workers, or use the DALI backend (which splits by sample)")
    if backend == "dali":  # imported only when chosen: nvidia.dali is optional
        from fdtrain.data.loading.dali_pipeline import DaliLoader as cls
    else:
        from fdtrain.data.loading.torch_loader import TorchLoader as cls
    loader = cls(cfg, shards, train=train, rank=rank, world_size=world_size, device=device, dtype=dtype)
    loader.balance = balance
    log.info("data[%s] rank %d/%d: backend=%s (%s), %s, %d samples in %d shards, batch %d, %d steps/epoch",
             split, rank, world_size, backend, why, loader.describe(), shards.num_samples, shards.num_shards,
             batch, loader.steps_per_epoch)
    return loader
