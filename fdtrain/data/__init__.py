"""Data: WebDataset shards on disk -> batches on the training device.

``build_loader(cfg, split)`` is the one entry point for every backend (DALI or the PyTorch
fallback); see ``fdtrain/data/loader.py`` for the contract. This module stays light: torch, DALI
and webdataset are imported only when a loader is built, so ``fdtrain --help`` stays instant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fdtrain.data.loader import Loader


class DataError(RuntimeError):
    """Data that cannot be loaded: the message names the split, folder, shard and/or sample key."""


def build_loader(cfg: Any, split: str, *, rank: int = 0, world_size: int = 1, device: Any = None,
                 path: str | None = None, dtype: Any = None) -> Loader:
    """Batches of one split for one rank; see :func:`fdtrain.data.loader.build_loader`."""
    from fdtrain.data.loader import build_loader as _build

    return _build(cfg, split, rank=rank, world_size=world_size, device=device, path=path, dtype=dtype)


__all__ = ["DataError", "build_loader"]
