"""Arguments and entry points of `fdtrain train | evaluate | predict` (no heavy imports here)."""
from __future__ import annotations

import argparse
import sys


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (may name a `base:` recipe)")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint of the run) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.epilog = "Any config field can be overridden: --section.key=value (e.g. --optim.lr=1e-4 --data.batch_size=16)."


def run_train(args: argparse.Namespace) -> int:
    from fdtrain.config import resolve

    cfg = resolve(args.recipe, list(args.overrides))
    if args.resume is not None:
        cfg.run.resume = args.resume
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    try:
        from fdtrain.engine.trainer import train
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("fdtrain"):
            print("fdtrain train: the training engine is not built yet; the recipe resolved fine.", file=sys.stderr)
            return 2
        raise
    return train(cfg)
