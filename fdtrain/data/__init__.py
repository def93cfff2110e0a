"""Data: the shard format, offline preparation (``prep``) and online loading (``loading``).

``build_loader(cfg, split)`` is the one entry point for every backend (DALI or the PyTorch
fallback); see ``fdtrain/data/loading/base.py`` for the contract. This module stays light: torch,
DALI and webdataset are imported only when ``build_loader`` or ``Loader`` is first used (PEP 562),
so ``fdtrain --help`` stays instant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fdtrain.data.format import DataError

if TYPE_CHECKING:  # pragma: no cover
    from fdtrain.data.loading import Loader, build_loader

_LOADING = ("Loader", "build_loader")


def __getattr__(name: str) -> Any:
    if name in _LOADING:  # on first use only: fdtrain.data.loading imports torch
        import fdtrain.data.loading as loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "Loader", "build_loader"]
