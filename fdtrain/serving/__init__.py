"""Serving: export a trained model to ONNX / TorchScript, and score with ONNX Runtime without torch.

  preprocess.py  image -> model input (Pillow + numpy): the one owner, used by `fdtrain predict`
                 on both paths (PyTorch and ONNX Runtime)
  export.py      `fdtrain export`: the inference graph, a JSON sidecar, and a self-check (needs torch)
  runtime.py     an exported .onnx + sidecar scored through ONNX Runtime (never imports torch)
  commands.py    CLI arguments of `fdtrain export` (no heavy imports)
"""
