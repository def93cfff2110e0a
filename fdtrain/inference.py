"""Load a trained model from a checkpoint with plain torch (no Accelerate, no DeepSpeed).

A checkpoint folder holds ``model.pt`` = {"config": Config.to_dict(), "state_dict": ..., "step",
"epoch", "metrics"}, read by fdtrain.model_file.load_model_file (its one reader);
``load_model`` rebuilds the model from the stored config and loads the weights.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Union

import torch
import torch.nn as nn

from fdtrain.config import Config, ConfigError, from_dict
from fdtrain.models import create_model_from_config

if TYPE_CHECKING:
    from fdtrain.model_file import ModelFile

# Wrappers that prefix parameter names: DDP ("module."), torch.compile ("_orig_mod.").
_PREFIXES = ("module.", "_orig_mod.")


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
    """(model, cfg) from a model.pt, a checkpoint folder or a run folder (its best, else newest,
    checkpoint); the model is in eval mode by default.

    ImageNet weights are never looked up: everything comes from the checkpoint.
    """
    from fdtrain.model_file import load_model_file

    return model_from_file(load_model_file(path), map_location, eval_mode)


def model_from_file(mf: ModelFile, map_location: Union[str, torch.device] = "cpu",
                    eval_mode: bool = True) -> tuple[nn.Module, Config]:
    """(model, cfg) rebuilt from a model file already read (fdtrain.model_file.load_model_file)."""
    from fdtrain.model_file import CheckpointError

    try:
        cfg = from_dict(mf.config)
    except ConfigError as e:
        raise CheckpointError(f"{mf.path}: its stored config does not resolve: {e}") from None
    model = create_model_from_config(dataclasses.replace(cfg.model, pretrained=False))
    try:
        missing, unexpected = model.load_state_dict(_strip_prefixes(mf.state_dict), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{mf.path}: weights do not fit the model its config describes: "
                              f"{str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{mf.path}: weights do not fit the model its config describes "
                              f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    model.to(map_location)
    if eval_mode:
        model.eval()
    return model, cfg
