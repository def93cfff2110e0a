"""The DeeperForensics-1.0 perturbation protocol: 7 distortion types x 5 severity levels.

Parameters per type and level are those of the published code, read in
EndlessSora/DeeperForensics-1.0, perturbation/add_distortion_to_video.py (get_distortion_parameter)
and perturbation/distortions.py (the operations); this module reimplements them on torch tensors.

Their operations take OpenCV BGR uint8 frames; ours take RGB uint8 tensors ``(..., 3, H, W)`` on any
device (the CPU in loader workers, the GPU in the main process), with the channel order handled in
the formulas, so there is no colour-space round trip through BGR. Where the reference truncates
float results to uint8 (``astype(np.uint8)``) we truncate too. Deviations, each also at its function:

* CS, GNC: OpenCV's float YCrCb conversion is reproduced with OpenCV's own constants, including its
  non-inverse pair (forward 0.713/0.564, inverse 1.403/1.773) and the small chroma offset that their
  [16, 235/240] rescaling leaves; results agree within one grey level (float32 order of operations).
* BW: the number of 8x8 grey blocks is ``min(H, W) // 256 * param`` there, which is 0 below 256 px; we
  use at least ``param`` blocks (a factor of 1), so small face crops are distorted at every level.
* GB: separable Gaussian of size k and sigma k/6 with reflect-101 borders (OpenCV's default);
  OpenCV's fixed-point 8-bit arithmetic differs from our float32 by at most one grey level.
* JPEG: the reference's "JPEG compression" is *not* a JPEG encode: it downscales by an integer factor
  (2..6) and upscales back with ``cv2.resize`` (bilinear, half-pixel centres, no antialiasing). We do
  the same with ``F.interpolate`` and round to uint8 in between, as cv2 returns uint8.
* VC: the reference runs ``ffmpeg -i in.mp4 -crf C out.mp4`` (libx264, preset medium) on the whole
  source video. Shards hold face crops of sampled frames, so we encode those crops of one video, in
  frame order, as a 25 fps H.264 clip (PyAV's libx264, yuv420p, preset medium, one thread so the
  bitstream does not depend on the machine) at the same CRF, and decode it back.

The random parts (BW block positions, GNC noise) are seeded per (seed, sample key, type, level).
BW positions are drawn on the CPU (identical on every device); GNC noise is drawn on the image's
device, so it repeats exactly on the same kind of device (CPU and CUDA generators differ).
"""
from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch
import torch.nn.functional as F

# type -> (name, parameter per level 1..5, unit of the parameter); levels are 1-based
PROTOCOL: dict[str, tuple[str, tuple, str]] = {
    "CS": ("colour saturation change", (0.4, 0.3, 0.2, 0.1, 0.0), "chroma scale"),
    "CC": ("colour contrast change", (0.85, 0.725, 0.6, 0.475, 0.35), "intensity scale"),
    "BW": ("local block-wise distortion", (16, 32, 48, 64, 80), "8x8 grey blocks per 256 px of short side"),
    "GNC": ("white Gaussian noise in colour components", (0.001, 0.002, 0.005, 0.01, 0.05), "noise variance"),
    "GB": ("Gaussian blur", (7, 9, 13, 17, 21), "kernel size k, sigma k/6"),
    "JPEG": ("JPEG compression (down/up-sampling)", (2, 3, 4, 5, 6), "downsampling factor"),
    "VC": ("video compression (H.264)", (30, 32, 35, 38, 40), "x264 CRF"),
}
TYPES: tuple[str, ...] = tuple(PROTOCOL)
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)


def parse_types(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Distortion types from 'CS,GB' / ['cs', 'GB'] / 'all' (case-insensitive), in protocol order;
    ValueError naming the bad ones (config and the CLI say which field or flag)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items or [s.lower() for s in items] == ["all"]:
        return list(TYPES)
    bad = [s for s in items if s.upper() not in TYPES]
    if bad:
        valid = ", ".join(f"{t} ({PROTOCOL[t][0]})" for t in TYPES)
        raise ValueError(f"unknown distortion type(s) {bad}: valid types are {valid}, or 'all'")
    wanted = {s.upper() for s in items}
    return [t for t in TYPES if t in wanted]


def parse_levels(spec: str | list | tuple | None) -> list[int]:
    """Severity levels from '1-5', '1,3,5', '2' or a list of ints; each in 1..5."""
    if spec is None or spec == "" or spec == []:
        return list(LEVELS)
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for p in parts:
        text = str(p).strip()
        try:
            if "-" in text.strip("-"):
                a, b = (int(v) for v in text.split("-", 1))
                vals = list(range(a, b + 1)) if a <= b else [a, b]
            else:
                vals = [int(text)]
        except ValueError:
            raise ValueError(f"bad severity level '{text}': valid levels are 1, 2, 3, 4, 5 "
                              "(a list '1,3,5' or a range '1-5')") from None
        bad = [v for v in vals if v not in LEVELS]
        if bad or not vals:
            raise ValueError(f"bad severity level '{text}': valid levels are 1, 2, 3, 4, 5 "
                              "(a list '1,3,5' or a range '1-5')")
        out.update(vals)
    return sorted(out)
IMAGE_TYPES: tuple[str, ...] = tuple(t for t in TYPES if t != "VC")  # per frame; VC needs the whole video
BLOCK = 8  # BW block width (reference: width = 8, value 128)
VC_FPS = 25

# OpenCV's float RGB <-> YCrCb constants (cv::cvtColor, COLOR_BGR2YCrCb / COLOR_YCrCb2BGR)
_KR, _KG, _KB = 0.299, 0.587, 0.114
_CR_FWD, _CB_FWD = 0.713, 0.564
_CR_R, _CR_G, _CB_G, _CB_B = 1.403, -0.714, -0.344, 1.773


def parameter(dtype: str, level: int):
    """The protocol's parameter of a type at a level (1..5)."""
    return PROTOCOL[dtype][1][level - 1]


def condition_seed(seed: int, key: str, dtype: str, level: int) -> int:
    """A 63-bit seed of one (sample, condition): the same on every rank, worker and run."""
    h = hashlib.sha1(f"{int(seed)}|{key}|{dtype}|{int(level)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


# --------------------------------------------------------------------------------------------
# The operations on uint8 RGB tensors (..., 3, H, W)
# --------------------------------------------------------------------------------------------
def _to_uint8_trunc(x: torch.Tensor) -> torch.Tensor:
    """float -> uint8 as ``np.clip(x, 0, 255).astype(np.uint8)``: clip, then truncate."""
    return x.clamp_(0.0, 255.0).to(torch.uint8)


def _ycrcb(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y, Cr - delta, Cb - delta of OpenCV's float conversion (delta cancels on the way back)."""
    f = img.float()
    r, g, b = f.unbind(-3)
    y = _KR * r + _KG * g + _KB * b
    return y, (r - y) * _CR_FWD, (b - y) * _CB_FWD


def _rgb(y: torch.Tensor, cr: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    return torch.stack((y + _CR_R * cr, y + _CR_G * cr + _CB_G * cb, y + _CB_B * cb), dim=-3)


def color_saturation(img: torch.Tensor, param: float) -> torch.Tensor:
    """CS: chroma scaled by ``param`` around grey, luma kept (reference: YCbCr, Cb/Cr -> 0.5 + (c - 0.5) p).

    The reference rescales OpenCV's float chroma C (already offset by 0.5) as if it were in [0, 1]
    ((C*224+16)/255) before scaling it around 0.5; worked through, that leaves Cr, Cb multiplied by p
    and shifted by -(1 - p)/448, which we apply as is (it moves some values across a truncation step).
    """
    y, cr, cb = _ycrcb(img)
    shift = -(1.0 - param) / 448.0
    return _to_uint8_trunc(_rgb(y, cr * param + shift, cb * param + shift))


def color_contrast(img: torch.Tensor, param: float) -> torch.Tensor:
    """CC: every intensity multiplied by ``param`` (a contrast change towards black), truncated."""
    return _to_uint8_trunc(img.float() * param)


def block_positions(height: int, width: int, param: int, seed: int) -> torch.Tensor:
    """(N, 2) top-left (row, col) of the BW blocks, drawn on the CPU from ``seed``.

    Reference: ``min(H, W) // 256 * param`` blocks, corners uniform in [0, H-1-8] x [0, W-1-8]
    (``random.randint``, inclusive); the count has a floor of ``param`` here (see the module doc).
    """
    n = max(1, min(height, width) // 256) * int(param)
    if height <= BLOCK or width <= BLOCK:
        return torch.zeros((0, 2), dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, height - BLOCK, (n,), generator=g)
    cols = torch.randint(0, width - BLOCK, (n,), generator=g)
    return torch.stack((rows, cols), dim=1)


def block_wise(img: torch.Tensor, param: int, seed: int) -> torch.Tensor:
    """BW: 8x8 blocks of grey 128 pasted at seeded random positions (later blocks over earlier)."""
    out = img.clone()
    for r, c in block_positions(img.shape[-2], img.shape[-1], param, seed).tolist():
        out[..., r:r + BLOCK, c:c + BLOCK] = 128
    return out


def gnc_scales(param: float) -> tuple[float, float]:
    """Standard deviations of the noise added to Y and to Cr/Cb (OpenCV float units, 0..255).

    Reference: ``ycbcr = bgr2ycbcr(img) / 255; b = (ycbcr + sqrt(param) * randn) * 255``, then
    ``ycbcr2bgr`` maps Y' back with (Y' * 255 - 16) / 219 and chroma with / 224: the noise reaches
    Y with std 255^2 / 219 * sqrt(param) and Cr, Cb with 255^2 / 224 * sqrt(param).
    """
    s = math.sqrt(param)
    return 255.0 * 255.0 / 219.0 * s, 255.0 * 255.0 / 224.0 * s


def gaussian_noise_color(img: torch.Tensor, param: float, seed: int, noise: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """GNC: i.i.d. N(0, 1) noise on Y, Cr and Cb (scaled by ``gnc_scales``), back to RGB, clip, truncate.

    ``noise`` (3, H, W) replaces the seeded draw (tests); otherwise it is drawn on the image's device.
    """
    y, cr, cb = _ycrcb(img)
    if noise is None:
        g = torch.Generator(device=img.device).manual_seed(seed)
        noise = torch.randn((3, *img.shape[-2:]), generator=g, device=img.device, dtype=torch.float32)
    sy, sc = gnc_scales(param)
    return _to_uint8_trunc(_rgb(y + sy * noise[0], cr + sc * noise[1], cb + sc * noise[2]))


def gaussian_kernel(ksize: int, sigma: float) -> torch.Tensor:
    """The normalized 1-D Gaussian of OpenCV's getGaussianKernel(ksize, sigma) for sigma > 0."""
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (k / k.sum()).float()


def gaussian_blur(img: torch.Tensor, ksize: int) -> torch.Tensor:
    """GB: Gaussian blur, kernel ``ksize`` x ``ksize``, sigma ``ksize / 6`` (reference:
    ``cv2.GaussianBlur(img, (k, k), k / 6)``), reflect-101 borders, separable, rounded to uint8."""
    lead = img.shape[:-3]
    x = img.reshape(-1, *img.shape[-3:]).float()
    c = x.shape[1]
    k = gaussian_kernel(ksize, ksize / 6.0).to(x.device)
    pad = ksize // 2
    if min(x.shape[-2:]) <= pad:  # reflect padding needs more pixels than the radius
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    else:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # torch's reflect = OpenCV's BORDER_REFLECT_101
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, ksize), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, ksize, 1), groups=c)
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(*lead, *x.shape[-3:])


def _bilinear_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2.resize INTER_LINEAR on uint8: half-pixel centres, no antialiasing, rounded."""
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def jpeg_downup(img: torch.Tensor, factor: int) -> torch.Tensor:
    """JPEG (the reference's): resize to (H // f, W // f) and back to (H, W), bilinear both ways."""
    lead = img.shape[:-3]
    x = img.reshape(-1, *img.shape[-3:])
    h, w = x.shape[-2:]
    small = _bilinear_uint8(x, (max(1, h // factor), max(1, w // factor)))
    return _bilinear_uint8(small, (h, w)).reshape(*lead, 3, h, w)


def distort_image(img: torch.Tensor, dtype: str, level: int, seed: int) -> torch.Tensor:
    """One image distortion at one level; ``seed`` from ``condition_seed`` (used by BW and GNC)."""
    p = parameter(dtype, level)
    if dtype == "CS":
        return color_saturation(img, p)
    if dtype == "CC":
        return color_contrast(img, p)
    if dtype == "BW":
        return block_wise(img, p, seed)
    if dtype == "GNC":
        return gaussian_noise_color(img, p, seed)
    if dtype == "GB":
        return gaussian_blur(img, p)
    if dtype == "JPEG":
        return jpeg_downup(img, p)
    raise ValueError(f"distort_image: '{dtype}' is not an image distortion (have {', '.join(IMAGE_TYPES)})")


# --------------------------------------------------------------------------------------------
# Video compression (CPU, PyAV)
# --------------------------------------------------------------------------------------------
def video_compression(frames: list[torch.Tensor], crf: int) -> list[torch.Tensor]:
    """VC: the frames (uint8 (3, H, W), one video, in order) through libx264 at ``crf`` and back.

    Frames of different sizes are padded (edge-replicated) to the largest, and to even sides for
    yuv420p; each decoded frame is cropped back to its own size.
    """
    if not frames:
        return []
    decoded = decode_h264(encode_h264(frames, crf))
    if len(decoded) != len(frames):
        raise RuntimeError(f"video_compression: {len(frames)} frames in, {len(decoded)} decoded")
    return [d[:, : f.shape[-2], : f.shape[-1]].contiguous() for d, f in zip(decoded, frames)]


def encode_h264(frames: list[torch.Tensor], crf: int) -> bytes:
    """An MP4 (H.264, yuv420p, 25 fps, x264 preset medium, one thread) of uint8 (3, H, W) frames."""
    import av

    h = max(f.shape[-2] for f in frames)
    w = max(f.shape[-1] for f in frames)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=VC_FPS)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.options = {"crf": str(int(crf)), "preset": "medium", "threads": "1"}
        for f in frames:
            pad = (0, stream.width - f.shape[-1], 0, stream.height - f.shape[-2])
            full = F.pad(f[None].float(), pad, mode="replicate")[0].to(torch.uint8) if any(pad) else f
            arr = np.ascontiguousarray(full.permute(1, 2, 0).cpu().numpy())
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_h264(data: bytes) -> list[torch.Tensor]:
    """Every frame of an encoded clip as uint8 (3, H, W), in presentation order."""
    import av

    with av.open(io.BytesIO(data), mode="r") as inp:
        return [torch.from_numpy(fr.to_ndarray(format="rgb24")).permute(2, 0, 1) for fr in inp.decode(video=0)]
