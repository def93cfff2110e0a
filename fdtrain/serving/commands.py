"""Arguments and entry point of `fdtrain export` (no heavy imports here)."""
from __future__ import annotations

import argparse
import sys


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="model.pt, a checkpoint folder (step-N/), or a run folder (its best, else newest, checkpoint)")
    p.add_argument("--format", required=True, help="onnx or torchscript")
    p.add_argument("--out", required=True, help="output file (.onnx / .pt); the sidecar goes to OUT.json")
    p.add_argument("--input-size", type=int, default=0, help="square input side (default: the model's input_size)")
    p.add_argument("--with-reconstructions", action="store_true",
                   help="also output the real and fake reconstructions (FakeDiffer variants only)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17: ONNX Runtime >= 1.13, TensorRT >= 8.6)")
    p.add_argument("--dynamo", action="store_true",
                   help="ONNX through torch.export (torch's new exporter; needs onnxscript) instead of the "
                        "TorchScript-based one")
    p.add_argument("--atol", type=float, default=1e-4, help="self-check tolerance: atol + rtol*|pytorch output|")
    p.add_argument("--rtol", type=float, default=1e-4)


def run_export(args: argparse.Namespace) -> int:
    import json

    from fdtrain.serving.export import FORMATS, ExportError, export

    if args.format not in FORMATS:  # before torch is imported: a typo should not cost seconds
        print(f"fdtrain export: --format {args.format!r}: unknown format; choose one of {list(FORMATS)}",
              file=sys.stderr)
        return 2
    try:
        side = export(args.checkpoint, args.format, args.out, input_size=args.input_size,
                      with_reconstructions=args.with_reconstructions, opset=args.opset, dynamo=args.dynamo,
                      atol=args.atol, rtol=args.rtol)
    except (FileNotFoundError, ExportError) as e:
        print(f"fdtrain export: {e}", file=sys.stderr)
        return 2
    worst = max(c["max_abs_diff"] for c in side["verified"]["checks"])
    print(f"wrote {args.out} ({side['format']}, input {side['input_size']} px, outputs "
          f"{[o['name'] for o in side['outputs']]}) and {args.out}.json")
    print(f"verified against PyTorch at batch sizes {sorted({c['batch'] for c in side['verified']['checks']})}: "
          f"max |diff| {worst:.3g} (tolerance {args.atol:g} + {args.rtol:g}*|value|)")
    print(json.dumps({"checkpoint_sha256": side["checkpoint"]["sha256"]}))
    return 0
