"""Load a trained model from a checkpoint with plain torch (no Accelerate, no DeepSpeed).

A checkpoint folder holds ``model.pt`` = {"config": Config.to_dict(), "state_dict": ..., "step",
"epoch", "metrics"}; ``load_model`` rebuilds the model from the stored config and loads the weights.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from fdtrain.config import Config, ConfigError, from_dict
from fdtrain.models import create_model_from_config

# Wrappers that prefix parameter names: DDP ("module."), torch.compile ("_orig_mod.").
_PREFIXES = ("module.", "_orig_mod.")


def _model_file(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (expected a checkpoint folder with model.pt, or the file)")
    return p


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for pre in _PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    return out


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
               eval_mode: bool = True) -> tuple[nn.Module, Config]:
    """(model, cfg) from a checkpoint folder or its model.pt; the model is in eval mode by default.

    ImageNet weights are never looked up: everything comes from the checkpoint.
    """
    from fdtrain.engine.checkpoint import CheckpointError, load_file

    file = _model_file(path)
    ckpt = load_file(file)
    for key in ("config", "state_dict"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{file}: not an fdtrain model file: no '{key}' entry (has {have}); "
                                  "fdtrain writes model.pt with its config and weights")
    try:
        cfg = from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{file}: its stored config does not resolve: {e}") from None
    model = create_model_from_config(dataclasses.replace(cfg.model, pretrained=False))
    try:
        missing, unexpected = model.load_state_dict(_strip_prefixes(ckpt["state_dict"]), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{file}: weights do not fit the model its config describes: "
                              f"{str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not fit the model its config describes "
                           f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    model.to(map_location)
    if eval_mode:
        model.eval()
    return model, cfg
