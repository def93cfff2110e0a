"""Score images and videos with a trained checkpoint: one JSON line per input.

Images are taken as face crops (what the shards hold) unless ``crop_images`` asks for detection.
Videos: ``frames`` frames spread uniformly over the video, the face of each cropped exactly as
ingestion does (fdtrain.data.prep.video / fdtrain.data.prep.faces: detector, score x area choice, square box
x1.3, short side 320, JPEG q95 round trip), then scored; the video's score is the mean frame score,
as the video-level metrics define it.

One Predictor serves both scoring paths: a PyTorch checkpoint, or an exported ONNX model through ONNX
Runtime (``--model FILE.onnx``). Both get their input from fdtrain.serving.preprocess, and the ONNX
path never imports torch (nothing here does at module level), so a serving host needs no torch.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fdtrain.config import EvalConfig
from fdtrain.data.prep.video import FRAMES_PER_VIDEO
from fdtrain.serving.preprocess import to_batch

log = logging.getLogger(__name__)


@dataclass
class PredictOptions:
    frames: int = FRAMES_PER_VIDEO  # frames sampled per video, as `fdtrain shards make` takes them
    detector: str = "dlib"  # fdtrain.data.prep.faces.make_detector spec, for videos (and images with crop_images)
    crop_images: bool = False  # detect and crop faces in still images too
    margin: float = 1.3
    crop_size: int = 320  # short side of a crop before the model's resize, as ingestion stores it
    jpeg_quality: int = 95  # ingestion stores JPEG q95 crops; scoring the same bytes avoids a shift
    batch_size: int = 16
    threshold: float = EvalConfig.threshold


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given; folders contribute their images and videos (sorted, not recursive)."""
    from fdtrain.data.format import SOURCE_IMAGE_SUFFIXES
    from fdtrain.data.prep.video import VIDEO_EXTS

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in SOURCE_IMAGE_SUFFIXES + VIDEO_EXTS)
        else:
            out.append(p)
    return out


class TorchLogits:
    """A PyTorch model as the Predictor's scorer: (N,3,S,S) float32 batch -> (N,) logits."""

    def __init__(self, model, device):
        self.model, self.device = model.to(device).eval(), device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


class Predictor:
    def __init__(self, logits, input_size: int, opts: PredictOptions):
        """``logits``: TorchLogits, fdtrain.serving.runtime.OnnxModel, or any batch -> logits callable."""
        self.logits, self.size, self.opts = logits, input_size, opts
        self._detector = None

    def detector(self):
        if self._detector is None:
            from fdtrain.data.prep.faces import make_detector

            self._detector = make_detector(self.opts.detector)
        return self._detector

    def _face(self, rgb: np.ndarray, video: str, frame: int) -> np.ndarray | None:
        """The face crop of one frame, as ingestion makes it (None when no face is found)."""
        from fdtrain.data.prep.faces import crop_face, encode_image, pick_face
        from fdtrain.data.prep.video import load_rgb

        face = pick_face(self.detector().detect(rgb, video=video, frame=frame, source=video))
        if face is None:
            return None
        crop = crop_face(rgb, face[0], self.opts.margin, self.opts.crop_size)
        return load_rgb(encode_image(crop, "jpg", self.opts.jpeg_quality))

    def scores(self, crops: list[np.ndarray]) -> list[float]:
        out = []
        for i in range(0, len(crops), self.opts.batch_size):
            logits = np.asarray(self.logits(to_batch(crops[i:i + self.opts.batch_size], self.size)), np.float64)
            out += (1.0 / (1.0 + np.exp(-logits))).tolist()
        return out

    def predict(self, path: Path) -> dict[str, Any]:
        from fdtrain.data.format import SOURCE_IMAGE_SUFFIXES
        from fdtrain.data.prep.video import VIDEO_EXTS, load_rgb, read_video_frames

        rec: dict[str, Any] = {"path": str(path)}
        suffix = path.suffix.lower()
        try:
            if suffix in SOURCE_IMAGE_SUFFIXES:
                rec["kind"] = "image"
                rgb = load_rgb(path)
                crop = self._face(rgb, str(path), 0) if self.opts.crop_images else rgb
                if crop is None:
                    return {**rec, "score": None, "error": "no face found"}
                rec["score"] = self.scores([crop])[0]
            elif suffix in VIDEO_EXTS:
                rec["kind"] = "video"
                frames, total = read_video_frames(path, self.opts.frames)
                crops = [(i, c) for i, rgb in frames if (c := self._face(rgb, str(path), i)) is not None]
                rec.update(frames_total=total, frames_sampled=len(frames), faces=len(crops))
                if not crops:
                    return {**rec, "score": None, "error": f"no face found in {len(frames)} sampled frames"}
                frame_scores = self.scores([c for _, c in crops])
                rec["frame_scores"] = {str(i): round(s, 6) for (i, _), s in zip(crops, frame_scores)}
                rec["score"] = float(np.mean(frame_scores))
            else:
                return {**rec, "score": None, "error": f"unsupported file type '{suffix}' "
                                                         f"(images {SOURCE_IMAGE_SUFFIXES}, videos {VIDEO_EXTS})"}
        except Exception as e:  # noqa: BLE001 - whatever one input does (a decompression bomb, a container
            # without video, a decoder crash), the others are still scored; its line says why it was not
            return {**rec, "score": None, "error": f"{type(e).__name__}: {e}"}
        rec["label"] = "fake" if rec["score"] > self.opts.threshold else "real"
        return rec


def predict_paths(checkpoint: str | os.PathLike, paths: list[str], opts: PredictOptions,
                  device: str = "auto") -> Iterator[dict[str, Any]]:
    """Yield one record per input: {"path", "kind", "score", "label", ...} or with "error".

    ``checkpoint``: a model.pt / checkpoint / run folder (PyTorch), or an exported ``.onnx`` file
    (ONNX Runtime, with the sidecar `fdtrain export` wrote beside it; torch is not imported).
    """
    if Path(checkpoint).suffix.lower() == ".onnx":
        from fdtrain.serving.runtime import OnnxModel

        onnx_model = OnnxModel(checkpoint, device=device)
        predictor = Predictor(onnx_model, onnx_model.input_size, opts)
    else:
        import torch

        from fdtrain.inference import load_model

        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        model, cfg = load_model(checkpoint)
        predictor = Predictor(TorchLogits(model, dev), cfg.model.input_size, opts)
    for p in expand_inputs(paths):
        yield predictor.predict(p)
