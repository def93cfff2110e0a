"""fdtrain command line: parses, resolves the recipe, and calls one function per subcommand.

Each subcommand's arguments live beside its implementation in a light module (no torch import at
module level, so ``--help`` is instant): ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fdtrain import report_error

# (command path, module that implements it, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train",), "fdtrain.engine.commands:train", "train a model from a YAML recipe"),
    (("evaluate",), "fdtrain.engine.commands:evaluate", "frame- and video-level metrics of a checkpoint on shards"),
    (("predict",), "fdtrain.engine.commands:predict", "score images or videos with a checkpoint (JSON lines)"),
    (("export",), "fdtrain.serving.commands:export", "a checkpoint as an ONNX or TorchScript graph, checked"),
    (("robustness",), "fdtrain.engine.robustness:robustness", "DeeperForensics-1.0 perturbation sweep of a checkpoint"),
    (("report",), "fdtrain.report:report", "mean ± std over runs (seeds) per recipe, beside the paper's numbers"),
    (("shards", "make"), "fdtrain.data.prep.commands:shards_make", "turn a dataset into WebDataset shards"),
    (("shards", "verify"), "fdtrain.data.prep.commands:shards_verify", "re-read every sample of a shard folder"),
    (("synth",), "fdtrain.data.prep.commands:synth", "write the synthetic FF++-shaped forgery benchmark"),
    (("bench", "model"), "fdtrain.bench.model:bench", "FakeDiffer vs plain Xception forward+backward images/s"),
    (("bench", "data"), "fdtrain.bench.data:bench", "loader images/s: DALI, fallback, naive baseline"),
    (("bench", "train"), "fdtrain.bench.train:bench", "end-to-end training images/s and data-wait share"),
    (("bench", "serve"), "fdtrain.bench.serve:bench", "predict images/s: PyTorch vs ONNX Runtime, side by side"),
    (("bench", "shards"), "fdtrain.bench.shards:bench", "face-crop ingestion rate for 1..N workers"),
]


def _load(spec: str):
    """``(add_arguments, run)`` of ``module:prefix``. Every command is built: a module or function
    that fails to import is a bug, raised here rather than hidden behind a placeholder."""
    mod_name, prefix = spec.split(":")
    mod = importlib.import_module(mod_name)
    return getattr(mod, f"add_{prefix}_arguments"), getattr(mod, f"run_{prefix}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdtrain",
        description="Train and evaluate FakeDiffer face-forgery detectors, from one CPU to many GPU nodes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, spec, help_ in COMMANDS:
        if len(path) == 2:
            if path[0] not in groups:
                g = sub.add_parser(path[0], help=f"{path[0]} subcommands")
                groups[path[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            holder = groups[path[0]]
        else:
            holder = sub
        add_arguments, run = _load(spec)
        p = holder.add_parser(path[-1], help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(_run=run, _cmd=" ".join(path))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `train` accepts free-form --section.key=value overrides after the recipe.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from fdtrain import FdtrainError
    from fdtrain.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        report_error(f"fdtrain: config error: {e}")
        return 2
    except FdtrainError as e:
        report_error(f"fdtrain {args._cmd}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
