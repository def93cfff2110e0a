"""Image -> model input, with Pillow and numpy only (no torch), for both scoring paths.

`fdtrain predict` feeds the PyTorch model and the ONNX Runtime session from this one function, so
the two paths see the same numbers. The normalisation is the loaders' (fdtrain.data.augment
``normalize_uint8`` and DALI's mean=std=127.5): v / 127.5 - 1, pixels in [-1, 1]. The resize is
Pillow's antialiased bilinear; torchvision's uint8 antialiased bilinear (the PyTorch fallback
loader) differs from it by at most one grey level on ~0.5% of pixels (measured, 320 -> 64/96/299
px), and DALI's agrees with torchvision's within one grey level.
"""
from __future__ import annotations

import numpy as np

# Mean and std per RGB channel on [0, 1] pixels (design/model.md, Input); the same as v / 127.5 - 1.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def normalization() -> dict:
    """What the exported sidecar states about the input, so a serving stack can rebuild it."""
    return {"mean": list(MEAN), "std": list(STD), "pixel_scale": 255.0, "layout": "NCHW", "channels": "RGB",
            "formula": "(uint8 / 255 - mean) / std  (= uint8 / 127.5 - 1)",
            "resize": "square, bilinear with antialiasing (Pillow), from the face crop"}


def to_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 RGB -> (3, size, size) float32 in [-1, 1]."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.shape[:2] != (size, size):
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    # the loaders' arithmetic (float32 multiply, then subtract), so the values match bit for bit
    x = rgb.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_batch(crops: list[np.ndarray], size: int) -> np.ndarray:
    """(N, 3, size, size) float32 from N face crops."""
    return np.stack([to_input(c, size) for c in crops])
