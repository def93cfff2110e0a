"""Online loading: shards -> batches on the training device (DALI, or the PyTorch fallback).

``build``: ``build_loader`` and the backend choice; ``base``: the ``Loader`` contract; ``sampling``:
seeds and data.balance; ``torch_loader`` / ``dali_pipeline``: the two backends; ``sweep_stream``:
the robustness sweep's stream. Importing this package imports torch.
"""
from __future__ import annotations

from fdtrain.data.loading.base import Loader
from fdtrain.data.loading.build import build_loader, choose_backend, dali_available

__all__ = ["Loader", "build_loader", "choose_backend", "dali_available"]
