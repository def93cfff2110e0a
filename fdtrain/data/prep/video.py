"""Frames from videos (PyAV) and from folders of images, N of them spread over the whole input."""
from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fdtrain.data.format import SOURCE_IMAGE_SUFFIXES

# Frames taken per video, spread uniformly, when shards are made (`fdtrain shards make`) and when a
# video is scored (`fdtrain predict`): one number, so a video's score averages the same frames'
# worth of evidence as the video-level metrics of its shards.
FRAMES_PER_VIDEO = 32

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def uniform_indices(total: int, n: int | None) -> list[int]:
    """``n`` frame indices spread over ``range(total)``, first and last included; all when n is None."""
    if total <= 0:
        return []
    if n is None or n >= total:
        return list(range(total))
    if n == 1:
        return [total // 2]
    # spacing (total-1)/(n-1) >= 1 when n <= total, so rounding keeps them distinct
    return [int(round(i * (total - 1) / (n - 1))) for i in range(n)]


def natural_key(name: str) -> list:
    """Sort "frame_2" before "frame_10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_number(path: str, position: int) -> int:
    """The frame index a file name states (its last run of digits), else its position in the list."""
    digits = re.findall(r"\d+", Path(path).stem)
    return int(digits[-1]) if digits else position


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in SOURCE_IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: natural_key(p.name))


def frame_numbers(paths: Sequence[str]) -> list[int]:
    """Frame indices for an ordered list of image files; positions when the names clash."""
    nums = [frame_number(p, i) for i, p in enumerate(paths)]
    return nums if len(set(nums)) == len(nums) else list(range(len(paths)))


def count_frames(path: str | os.PathLike) -> int:
    """Frames in the first video stream: the header's count, else the number of packets."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream in this container "
                             f"(streams: {[s.type for s in container.streams] or 'none'})")
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for p in container.demux(stream) if p.size)


def read_video_frames(path: str | os.PathLike, n: int | None) -> tuple[list[tuple[int, np.ndarray]], int]:
    """(``[(frame index, HxWx3 uint8 RGB)]``, frames in the video) for ``n`` frames spread uniformly.

    Every frame is decoded (seeking lands on key frames, not on the index asked for), but only the
    chosen ones are converted to RGB. When the header's count was too high the list is shorter than
    asked; the caller reports that.
    """
    import av

    total = count_frames(path)
    wanted = set(uniform_indices(total, n))
    out: list[tuple[int, np.ndarray]] = []
    if not wanted:
        return out, total
    last = max(wanted)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out.append((i, frame.to_ndarray(format="rgb24")))
            if i >= last:
                break
    return out, total


def load_rgb(data: bytes | str | os.PathLike) -> np.ndarray:
    """An image file (path or bytes) as HxWx3 uint8 RGB."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def write_test_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: int = 10,
                     codec: str = "mpeg4") -> None:
    """Encode RGB frames (even width/height) into a small video file; used by tests and benches."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "3"}  # near-lossless, so tests can check pixels
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
