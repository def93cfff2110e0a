"""Face detection and cropping.

Detectors are pluggable (``make_detector(spec)``):

- ``dlib`` (default): dlib's frontal-face HOG detector from the ``dlib-bin`` wheel; its weights are
  inside the package, nothing is downloaded. Options after a colon, e.g.
  ``dlib:upsample=1,max_side=480,retry_upsample=0``.
  OpenCV was the other candidate; OpenCV 5 no longer ships the Haar cascades and its YuNet needs
  a model file no package carries, so dlib it is.
- ``boxes:FILE.json``: precomputed boxes, ``{video key or source path: {frame: [x1, y1, x2, y2(, score)]}}``
  (source paths are relative to the dataset root, the extension optional);
  a frame without an entry takes the box of the nearest listed frame of its video.
- ``none``: the whole frame is the face (inputs that are crops already).
- ``package.module:Class``: any class with ``detect(rgb, *, video, frame, **info) -> [(box, score)]``
  (``video`` is the video key, ``info["source"]`` its path under the dataset root).

The chosen face is the detection with the best score x area: the largest face, but not a large
low-score false positive (dlib finds one under the astronaut's face in scikit-image's photo).
"""
from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


class Detector(Protocol):
    def detect(self, rgb: np.ndarray, *, video: str = "", frame: int = 0, **info) -> list[tuple[Box, float]]: ...


class DlibHog:
    """dlib's HOG + linear SVM frontal face detector (CPU: ~15 ms per 512 px image at upsample 0,
    ~60 ms at upsample 1)."""

    def __init__(self, upsample: int = 0, max_side: int = 640, threshold: float = 0.0, retry_upsample: int = 1):
        import dlib

        self.upsample, self.max_side, self.threshold = int(upsample), int(max_side), float(threshold)
        # HOG's window is 80 px: upsampling once finds faces down to 40 px but costs ~4x, so it is
        # only a second try on frames where the first pass found nothing
        self.retry_upsample = int(retry_upsample)
        self._det = dlib.get_frontal_face_detector()

    def detect(self, rgb: np.ndarray, *, video: str = "", frame: int = 0, **info) -> list[tuple[Box, float]]:
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w)) if self.max_side > 0 else 1.0
        img = rgb
        if scale < 1.0:  # detection on a smaller copy: faces in FF++/Celeb-DF are large, HOG is O(pixels)
            from PIL import Image

            img = np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        img = np.ascontiguousarray(img)
        rects, scores, _ = self._det.run(img, self.upsample, self.threshold)
        if not rects and self.retry_upsample > self.upsample:
            rects, scores, _ = self._det.run(img, self.retry_upsample, self.threshold)
        return [((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale), float(s))
                for r, s in zip(rects, scores)]


class JsonBoxes:
    """Boxes read from a JSON file instead of detected."""

    def __init__(self, path: str):
        self.path = path
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"boxes file {path}: {e}") from e
        self._boxes: dict[str, dict[int, tuple[Box, float]]] = {}
        for video, frames in raw.items():
            per = {}
            for fr, b in frames.items():
                if len(b) not in (4, 5):
                    raise ValueError(f"boxes file {path}: {video} frame {fr}: want [x1,y1,x2,y2(,score)], got {b}")
                per[int(fr)] = (tuple(float(v) for v in b[:4]), float(b[4]) if len(b) == 5 else 1.0)
            self._boxes[_norm_video(video)] = per

    def detect(self, rgb: np.ndarray, *, video: str = "", frame: int = 0, **info) -> list[tuple[Box, float]]:
        per = self._boxes.get(_norm_video(video)) or self._boxes.get(_norm_video(info.get("source", "")))
        if not per:
            return []
        nearest = min(per, key=lambda f: (abs(f - frame), f))
        return [per[nearest]]


def _norm_video(name: str) -> str:
    """Video names as a boxes file may spell them: key, relative path, with or without extension."""
    p = str(name).replace("\\", "/").strip("/")
    for ext in (".mp4", ".avi", ".mov", ".mkv", ".webm"):
        if p.lower().endswith(ext):
            p = p[: -len(ext)]
    return p


class WholeFrame:
    """The input is a face crop already."""

    def detect(self, rgb: np.ndarray, *, video: str = "", frame: int = 0, **info) -> list[tuple[Box, float]]:
        h, w = rgb.shape[:2]
        return [((0.0, 0.0, float(w), float(h)), 1.0)]


def make_detector(spec: str) -> Detector:
    """``dlib[:k=v,...]``, ``boxes:FILE``, ``none`` or ``package.module:Class[:k=v,...]``."""
    name, _, rest = spec.partition(":")
    if name == "none":
        return WholeFrame()
    if name == "boxes":
        if not rest:
            raise ValueError("detector 'boxes' needs a file: boxes:PATH.json")
        return JsonBoxes(rest)
    if name == "dlib":
        return DlibHog(**_kwargs(rest, spec))
    if "." in name:
        cls_name, _, opts = rest.partition(":")
        try:
            cls = getattr(importlib.import_module(name), cls_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"detector {spec!r}: cannot import {name}:{cls_name}: {e}") from e
        return cls(**_kwargs(opts, spec))
    raise ValueError(f"unknown detector {spec!r}: use dlib, boxes:FILE, none or package.module:Class")


def _kwargs(text: str, spec: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        k, eq, v = part.partition("=")
        if not eq:
            raise ValueError(f"detector {spec!r}: option {part!r} should be key=value")
        out[k.strip()] = json.loads(v) if v.strip()[:1].isdigit() or v.strip()[:1] == "-" else v
    return out


def pick_face(detections: Sequence[tuple[Box, float]]) -> tuple[Box, float] | None:
    """The detection with the best score x area (scores of HOG are margins that can be <= 0)."""
    best, best_val = None, -math.inf
    for box, score in detections:
        area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
        if area <= 0:
            continue
        val = max(score, 1e-3) * area
        if val > best_val:
            best, best_val = (box, score), val
    return best


def square_box(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A square of side max(w, h) x margin around the box centre, moved inside the frame where it
    fits and clipped where it does not."""
    x1, y1, x2, y2 = box
    side = max(1, min(int(round(max(x2 - x1, y2 - y1) * margin)), max(width, height)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = min(max(int(round(cx - side / 2)), 0), max(width - side, 0))
    top = min(max(int(round(cy - side / 2)), 0), max(height - side, 0))
    return left, top, min(width, left + side), min(height, top + side)


def resize_short_side(rgb: np.ndarray, short_side: int) -> np.ndarray:
    """Resize so the short side is ``short_side`` (0 keeps the size)."""
    h, w = rgb.shape[:2]
    if short_side <= 0 or min(h, w) == short_side:
        return rgb
    from PIL import Image

    s = short_side / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def crop_face(rgb: np.ndarray, box: Box, margin: float = 1.3, short_side: int = 320) -> np.ndarray:
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = square_box(box, margin, w, h)
    return resize_short_side(np.ascontiguousarray(rgb[y1:y2, x1:x2]), short_side)


def encode_image(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """JPEG (4:4:4, no chroma subsampling: forgery traces live in colour detail too) or PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(rgb)
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=int(quality), subsampling=0)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"image format {fmt!r}: use jpg or png")
    return buf.getvalue()
