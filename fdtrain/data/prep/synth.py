"""The synthetic FF++-shaped forgery benchmark (`fdtrain synth`).

Procedural faces stand in for FaceForensics++ so that every protocol runs on a CPU in minutes.
Everything follows from the seed. An identity is a face drawn from its own parameters (skin tone
and texture, face shape, hair, eyes, brows, nose, mouth); its "video" is a few frames of that face
in a scene (background, light, head pose) with small motion (translation, scale, roll jitter),
changing expression (mouth, blinks) and camera noise. Identities are split train/val/test about
2/3, 1/6, 1/6 (FF++ has 72/14/14; a small test set needs the extra identities for a steady AUC)
and paired inside their split; pair [a, b] gives the fakes a_b (target a's video, source b) and
b_a, as in FF++. Four manipulations leave different traces:

- Deepfakes: b's inner face, rendered at a's pose, decoded at low resolution (blurred) and blended
  into a's frame with a soft elliptical mask: a blend seam where the skin tones differ.
- Face2Face: a's own face driven by another expression, its lower face warped around the mouth by
  a smooth displacement field and re-rendered smoother than the camera's image; identity unchanged.
- FaceSwap: b's inner face pasted sharp, with a colour gain and an illumination gradient that do
  not match a's scene (colour/illumination mismatch in the blended region).
- NeuralTextures: a's lower face re-synthesised with a periodic texture (a frequency signature
  like the grid an upsampling network leaves); no smoothing, no colour change, no warp, so a
  detector that learnt the other three has nothing of this one to go on.

Written as PNG face crops in an FF++ tree (``original_sequences/youtube/raw/frames/<id>/0000.png``,
``manipulated_sequences/<Method>/raw/frames/<a>_<b>/``, ``splits/{train,val,test}.json``) plus
``synth.json``; ``fdtrain shards make --source synth`` turns it into shards.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

# `fdtrain synth` defaults (the command line shows them): sized so that synth + shards + a short CPU
# training + evaluation of the demo take about 10 minutes on 2 cores.
SYNTH_DEFAULTS = {"videos": 72, "frames": 4, "size": 128, "seed": 42}
METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
COMPRESSION = "raw"
VERSION = 1
_TQDM_INTERVAL = 0.5 if sys.stderr.isatty() else 30.0  # plain logs (SLURM, CI) get a line now and then
_TAG = {"identity": 1, "video": 2, "split": 3, **{m: 10 + i for i, m in enumerate(METHODS)}}


def _rng(seed: int, tag: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TAG[tag], *ids])


# ---------------------------------------------------------------------------------------------
# Identities, scenes and frames
# ---------------------------------------------------------------------------------------------
def make_identity(seed: int, i: int) -> dict:
    r = _rng(seed, "identity", i)
    tone = r.uniform(0, 1)
    skin = np.array([236, 198, 168]) * (1 - tone) + np.array([120, 78, 56]) * tone + r.normal(0, 6, 3)
    hair = [np.array(c) for c in ([25, 20, 18], [70, 45, 28], [140, 95, 55], [200, 170, 110], [120, 45, 25],
                                  [150, 150, 150])][r.integers(0, 6)] + r.normal(0, 8, 3)
    return {
        "face_a": r.uniform(0.25, 0.31), "face_b": r.uniform(0.34, 0.40), "skin": skin.clip(0, 255),
        "tex": r.normal(0, 1, (16, 16)), "tex_amp": r.uniform(3, 8),
        "hair": hair.clip(0, 255), "hair_top": r.uniform(0.10, 0.20), "hair_w": r.uniform(1.05, 1.25),
        "fringe": r.uniform(-0.28, -0.18),
        "eye_y": r.uniform(-0.09, -0.04), "eye_dx": r.uniform(0.095, 0.125), "eye_w": r.uniform(0.045, 0.062),
        "eye_h": r.uniform(0.022, 0.032), "iris": r.uniform(30, 160, 3), "iris_r": r.uniform(0.45, 0.7),
        "brow_dy": r.uniform(0.045, 0.07), "brow_w": r.uniform(0.05, 0.075), "brow_h": r.uniform(0.008, 0.016),
        "brow_tilt": r.uniform(-0.25, 0.25),
        "nose_len": r.uniform(0.07, 0.11), "nose_w": r.uniform(0.025, 0.04),
        "mouth_y": r.uniform(0.13, 0.19), "mouth_w": r.uniform(0.075, 0.11), "mouth_h": r.uniform(0.018, 0.03),
        "lip": (skin * 0.55 + np.array([170, 60, 70]) * 0.45 + r.normal(0, 8, 3)).clip(0, 255),
        "cheek": r.uniform(0.0, 0.25),
    }


def make_scene(seed: int, i: int, frames: int, size: int) -> dict:
    """The video of identity i: background, light, pose track, expressions, camera noise."""
    from scipy.ndimage import map_coordinates

    r = _rng(seed, "video", i)
    bg = r.normal(0, 1, (8, 8, 3)) * r.uniform(4, 12) + r.uniform(60, 190, 3)
    grid = np.mgrid[0:size, 0:size].astype(np.float32) / size * 7
    steps = r.normal(0, 1, (frames, 4)) * [0.9, 0.9, 0.01, 0.012]  # px, px, scale, radians per frame
    track = np.cumsum(steps, axis=0) + [r.normal(0, 2.5), r.normal(0, 2.5), r.uniform(0.95, 1.07), r.normal(0, 0.07)]
    return {
        "bg_img": np.stack([map_coordinates(bg[..., k], grid, order=1) for k in range(3)], -1).astype(np.float32),
        "light": r.normal(0, 1, 2) / 2.0, "light_amp": r.uniform(0.05, 0.2),
        "track": track,  # per frame: dx, dy, scale, roll
        "mouth_open": np.clip(np.cumsum(r.normal(0, 0.3, frames)) * 0.5 + r.uniform(0, 0.5), 0, 1),
        "blink": r.uniform(0, 1, frames) < 0.12,
        "noise_seed": int(r.integers(0, 2**31 - 1)), "noise_std": r.uniform(2.0, 4.0),
    }


class Canvas:
    """Pixel grid of one frame and its face coordinates (units of the image side, face centred)."""

    def __init__(self, size: int, scene: dict, t: int):
        dx, dy, sc, roll = scene["track"][t]
        self.size = size
        self.px = size * sc  # pixels per face unit
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        x0, y0 = x - (size / 2 + dx), y - (size / 2 + dy)
        c, s = math.cos(roll), math.sin(roll)
        self.u = (c * x0 + s * y0) / self.px
        self.v = (-s * x0 + c * y0) / self.px
        self._pose = (size / 2 + dx, size / 2 + dy, c, s)

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        """Image (x, y) of a point given in face coordinates."""
        x0, y0, c, s = self._pose
        return x0 + (c * u - s * v) * self.px, y0 + (s * u + c * v) * self.px

    def ellipse(self, cx: float, cy: float, a: float, b: float, feather_px: float = 1.0, tilt: float = 0.0) -> Mask:
        """Soft mask of an ellipse in face coordinates, edge ``feather_px`` pixels wide, computed only
        on the window around it (painting full frames was most of the rendering time)."""
        px, py = self.to_pixels(cx, cy)
        reach = max(a, b) * self.px + feather_px + 2
        y0, y1 = max(0, int(py - reach)), min(self.size, int(py + reach) + 1)
        x0, x1 = max(0, int(px - reach)), min(self.size, int(px + reach) + 1)
        sl = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
        u, v = self.u[sl] - cx, self.v[sl] - cy
        if tilt:
            c, s = math.cos(tilt), math.sin(tilt)
            u, v = c * u + s * v, -s * u + c * v
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        d = (r - 1.0) * (min(a, b) * self.px)
        return Mask(sl, np.clip(0.5 - d / max(feather_px, 1e-3), 0.0, 1.0).astype(np.float32), self.size)


class Mask:
    """A soft mask that is zero outside the window ``sl`` of a ``size`` x ``size`` frame."""

    def __init__(self, sl: tuple[slice, slice], m: np.ndarray, size: int):
        self.sl, self.m, self.size = sl, m, size

    def on(self, sl: tuple[slice, slice]) -> np.ndarray:
        out = np.zeros((sl[0].stop - sl[0].start, sl[1].stop - sl[1].start), np.float32)
        ys = slice(max(sl[0].start, self.sl[0].start), min(sl[0].stop, self.sl[0].stop))
        xs = slice(max(sl[1].start, self.sl[1].start), min(sl[1].stop, self.sl[1].stop))
        if ys.stop > ys.start and xs.stop > xs.start:
            out[ys.start - sl[0].start:ys.stop - sl[0].start, xs.start - sl[1].start:xs.stop - sl[1].start] = \
                self.m[ys.start - self.sl[0].start:ys.stop - self.sl[0].start,
                       xs.start - self.sl[1].start:xs.stop - self.sl[1].start]
        return out

    def full(self) -> np.ndarray:
        """HxWx1 array, for blending whole frames."""
        return self.on((slice(0, self.size), slice(0, self.size)))[..., None]

    def __mul__(self, other):
        if isinstance(other, Mask):
            return Mask(self.sl, self.m * other.on(self.sl), self.size)
        return Mask(self.sl, self.m * np.float32(other), self.size)

    __rmul__ = __mul__

    def __add__(self, other: Mask) -> Mask:
        sl = (slice(min(self.sl[0].start, other.sl[0].start), max(self.sl[0].stop, other.sl[0].stop)),
              slice(min(self.sl[1].start, other.sl[1].start), max(self.sl[1].stop, other.sl[1].stop)))
        return Mask(sl, self.on(sl) + other.on(sl), self.size)


def _sample(grid: np.ndarray, u: np.ndarray, v: np.ndarray, span: float) -> np.ndarray:
    """Bilinear lookup of a small texture grid over [-span, span]^2 of face coordinates."""
    from scipy.ndimage import map_coordinates

    n = grid.shape[0]
    gu, gv = (u / span + 1) / 2 * (n - 1), (v / span + 1) / 2 * (n - 1)
    if grid.ndim == 2:
        return map_coordinates(grid, [gv, gu], order=1, mode="nearest")
    return np.stack([map_coordinates(grid[..., k], [gv, gu], order=1, mode="nearest") for k in range(grid.shape[2])],
                    -1)


def render(ident: dict, scene: dict, t: int, size: int, expression_t: int | None = None) -> np.ndarray:
    """One frame (float32 HxWx3, 0..255) of ``ident`` in ``scene`` at time ``t``, without camera noise.

    ``expression_t`` takes the mouth/blink state from another time (Face2Face drives a's face with
    b's expression that way).
    """
    cv = Canvas(size, scene, t)
    et = t if expression_t is None else expression_t
    img = scene["bg_img"].copy()  # static: the camera does not move with the head
    shade = (1.0 + scene["light_amp"] * (scene["light"][0] * cv.u + scene["light"][1] * cv.v) / 0.3)[..., None]

    def paint(mask: Mask, colour) -> None:
        colour = np.asarray(colour, np.float32)
        if colour.ndim == 3:  # a per-pixel colour (shaded skin)
            colour = colour[mask.sl]
        m = mask.m[..., None]
        img[mask.sl] = img[mask.sl] * (1 - m) + colour * m

    fa, fb = ident["face_a"], ident["face_b"]
    paint(cv.ellipse(0, -0.04, fa * ident["hair_w"], fb + ident["hair_top"] * 0.6), ident["hair"] * 0.9)  # hair back
    paint(cv.ellipse(0, fb * 0.95, fa * 0.45, 0.2), ident["skin"] * 0.8 * shade)  # neck
    skin = ident["skin"] * shade + _sample(ident["tex"], cv.u, cv.v, 0.5)[..., None] * ident["tex_amp"]
    paint(cv.ellipse(0, 0, fa, fb), skin)
    cheek = ident["cheek"] * (cv.ellipse(-0.12, 0.07, 0.06, 0.04, 6) + cv.ellipse(0.12, 0.07, 0.06, 0.04, 6))
    paint(cheek * 0.5, np.array([200, 90, 90]) * shade)
    # fringe: the top of the face under the hair
    paint(cv.ellipse(0, ident["fringe"] - 0.12, fa * 1.08, 0.16), ident["hair"] * shade)
    for side in (-1, 1):
        ex, ey = side * ident["eye_dx"], ident["eye_y"]
        tilt = side * ident["brow_tilt"]
        paint(cv.ellipse(ex, ey - ident["brow_dy"], ident["brow_w"], ident["brow_h"], tilt=tilt),
              ident["hair"] * 0.7)
        eh = ident["eye_h"] * (0.15 if scene["blink"][et] else 1.0)
        white = cv.ellipse(ex, ey, ident["eye_w"], eh)
        paint(white, np.array([235, 232, 228]) * shade)
        ir = ident["eye_h"] * ident["iris_r"] * 1.3
        paint(white * cv.ellipse(ex, ey, ir, ir), ident["iris"])
        paint(white * cv.ellipse(ex, ey, ir * 0.45, ir * 0.45), [15, 15, 15])
        paint(cv.ellipse(ex, ey - eh * 0.9, ident["eye_w"] * 1.05, 0.006, 1.0), ident["skin"] * 0.55)  # lid
    nl, nw = ident["nose_len"], ident["nose_w"]
    paint(cv.ellipse(0.01, ident["eye_y"] + nl * 0.6, nw * 0.5, nl * 0.55, 3) * 0.35, ident["skin"] * 0.6 * shade)
    for side in (-1, 1):
        paint(cv.ellipse(side * nw * 0.55, ident["eye_y"] + nl * 1.1, nw * 0.3, nw * 0.18) * 0.8,
              ident["skin"] * 0.35)
    my, mw, mh = ident["mouth_y"], ident["mouth_w"], ident["mouth_h"]
    opened = float(scene["mouth_open"][et])
    paint(cv.ellipse(0, my, mw, mh * (1 + 0.9 * opened)), ident["lip"] * shade)
    if opened > 0.08:
        paint(cv.ellipse(0, my, mw * 0.75, mh * 0.9 * opened), [60, 20, 25])
        paint(cv.ellipse(0, my - mh * 0.55 * opened, mw * 0.55, mh * 0.25 * opened), [230, 225, 215])  # teeth
    else:
        paint(cv.ellipse(0, my, mw * 0.9, 0.004, 1.0), ident["lip"] * 0.45)
    return img


def camera_noise(scene: dict, t: int, size: int, salt: int = 0) -> np.ndarray:
    r = np.random.default_rng([scene["noise_seed"], t, salt])
    return r.normal(0, scene["noise_std"], (size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Manipulations: each takes the target's clean frame and returns the fake frame
# ---------------------------------------------------------------------------------------------
def _inner(src: dict, dst: dict) -> dict:
    """``dst``'s head (shape, hair) with ``src``'s inner face (skin, eyes, brows, nose, mouth)."""
    keys = ("skin", "tex", "tex_amp", "eye_y", "eye_dx", "eye_w", "eye_h", "iris", "iris_r", "brow_dy", "brow_w",
            "brow_h", "brow_tilt", "nose_len", "nose_w", "mouth_y", "mouth_w", "mouth_h", "lip", "cheek")
    return {**dst, **{k: src[k] for k in keys}}


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")


def _resample_down_up(img: np.ndarray, factor: float) -> np.ndarray:
    """Decode at low resolution: area-downsample then bilinear-upsample (a DF decoder's blur)."""
    from PIL import Image

    size = img.shape[0]
    small = max(8, int(round(size / factor)))
    chans = [Image.fromarray(img[..., k].astype(np.float32), mode="F") for k in range(3)]
    out = [np.asarray(c.resize((small, small), Image.BOX).resize((size, size), Image.BILINEAR)) for c in chans]
    return np.stack(out, -1)


def fake_params(method: str, r: np.random.Generator) -> dict:
    """Per-video settings of a manipulation; ``strength`` in [0.6, 1] scales its trace."""
    p = {"strength": float(r.uniform(0.6, 1.0))}
    if method == "Face2Face":
        tone = r.normal(0, 1, 3)
        p.update(sign=float(r.choice([-1, 1])), tone=tone / np.linalg.norm(tone))
    elif method == "FaceSwap":
        # random directions of unit length: the strength alone sets how far off the colour and light are
        gain, tilt = r.normal(0, 1, 3), r.normal(0, 1, 2)
        p.update(gain=gain / np.linalg.norm(gain) * math.sqrt(3), tilt=tilt / np.linalg.norm(tilt),
                 rim=float(r.choice([-1, 1])))
    elif method == "NeuralTextures":
        # periods that survive the loader's resize to ~96-128 px (a 2-3 px pattern would be filtered out)
        p.update(period=float(r.choice([5.0, 6.0, 7.0])), angle=float(r.uniform(0, math.pi)))
    return p


def fake_frame(method: str, a: dict, b: dict, scene: dict, t: int, size: int, p: dict) -> np.ndarray:
    """The frame t of fake video a_b (target a, source b) by ``method`` with settings ``p``."""
    target = render(a, scene, t, size) + camera_noise(scene, t, size)
    cv = Canvas(size, scene, t)
    st = p["strength"]
    if method == "Deepfakes":
        swap = render(_inner(b, a), scene, t, size) + camera_noise(scene, t, size, 1)
        swap = _resample_down_up(swap, 1.6 + 1.6 * st)
        # partial colour transfer towards the target: what is left shows as a seam
        mask = cv.ellipse(0, 0.03, a["face_a"] * 0.82, a["face_b"] * 0.78, feather_px=2.0 + 2.0 * (1 - st)).full()
        w = mask[..., 0] > 0.5
        keep = 0.35 + 0.6 * st
        swap = swap + (1 - keep) * (target[w].mean(0) - swap[w].mean(0))
        return target * (1 - mask) + swap * mask
    if method == "Face2Face":
        from scipy.ndimage import map_coordinates

        # a's face driven by b's expression at this time; the lower face re-rendered: warped around
        # the mouth and smoother than the camera's image
        src = render(a, scene, t, size, expression_t=(t + 1 + b["_index"]) % len(scene["mouth_open"]))
        src = src + camera_noise(scene, t, size)
        cy = a["mouth_y"]
        sig = 0.08 * cv.px
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        mcx, mcy = cv.to_pixels(0.0, cy)
        g = np.exp(-((xs - mcx) ** 2 + (ys - mcy) ** 2) / (2 * sig**2))
        amp = (4.0 + 3.0 * st) * p["sign"] * size / 128
        coords = [ys + amp * g * (ys - mcy) / sig, xs + 0.5 * amp * g * (xs - mcx) / sig]
        warped = np.stack([map_coordinates(src[..., k], coords, order=1, mode="nearest") for k in range(3)], -1)
        # re-rendered with the model's own estimate of skin tone and light: a little off
        warped = _blur(warped, 1.6 + 0.6 * st) + (5.0 + 5.0 * st) * p["tone"]
        mask = cv.ellipse(0, cy, a["face_a"] * 0.85, 0.13, feather_px=3.0).full()
        return target * (1 - mask) + warped * mask
    if method == "FaceSwap":
        swap = render(_inner(b, a), scene, t, size) + camera_noise(scene, t, size, 2)
        gain = 1 + (0.14 + 0.10 * st) * p["gain"]
        grad = 1 + (0.15 + 0.15 * st) * (p["tilt"][0] * cv.u + p["tilt"][1] * cv.v) / 0.3
        swap = swap * gain * grad[..., None]
        mask = cv.ellipse(0, 0.04, a["face_a"] * 0.78, a["face_b"] * 0.72, feather_px=1.5).full()
        rim = 4 * mask * (1 - mask) * (12 + 10 * st) * p["rim"]  # the blend boundary does not quite match
        return target * (1 - mask) + swap * mask + rim
    if method == "NeuralTextures":
        # no smoothing here: the trace is a frequency signature only, which the others do not have
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        ang = p["angle"]
        period = max(3.0, p["period"] * size / 128)  # at least 3 px: below that it aliases away
        wave = np.cos(2 * math.pi * (xs * math.cos(ang) + ys * math.sin(ang)) / period)
        # and a weaker one across it: a grid, as upsampling layers leave
        cross = np.cos(2 * math.pi * (-xs * math.sin(ang) + ys * math.cos(ang)) / period)
        amp = 6.0 + 6.0 * st
        tex = target + (amp * (0.7 * wave + 0.3 * cross))[..., None]
        mask = cv.ellipse(0, a["mouth_y"] + 0.02, a["face_a"] * 0.62, 0.11, feather_px=3.0).full()
        return target * (1 - mask) + tex * mask
    raise ValueError(f"unknown synthetic method {method!r}")


# ---------------------------------------------------------------------------------------------
# The benchmark tree
# ---------------------------------------------------------------------------------------------
def split_identities(n: int, seed: int) -> dict[str, list[int]]:
    """About 2/3 train, 1/6 val, 1/6 test, each split even (identities are paired inside it)."""
    if n < 6 or n % 2:
        raise ValueError(f"--videos: an even number >= 6, got {n}")
    n_test = max(2, 2 * round(n / 12))
    n_val = max(2, 2 * round(n / 12))
    order = _rng(seed, "split").permutation(n).tolist()
    return {"train": sorted(order[n_val + n_test:]), "val": sorted(order[:n_val]),
            "test": sorted(order[n_val:n_val + n_test])}


def pairs_for(ids: list[int], seed: int, split: str) -> list[tuple[int, int]]:
    r = np.random.default_rng([seed, _TAG["split"], len(split), sum(map(ord, split))])
    perm = r.permutation(ids).tolist()
    return [(perm[i], perm[i + 1]) for i in range(0, len(perm), 2)]


def _name(i: int) -> str:
    return f"{i:03d}"


def _save_frames(folder: Path, frames: list[np.ndarray]) -> None:
    from PIL import Image

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for t, f in enumerate(frames):
        Image.fromarray(np.clip(np.round(f), 0, 255).astype(np.uint8)).save(tmp / f"{t:04d}.png", compress_level=6)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _video_task(args) -> None:
    """Render one video (a real one, or one fake a_b by one method) into its frame folder."""
    out, seed, frames, size, method, ai, bi = args
    a = make_identity(seed, ai)
    scene = make_scene(seed, ai, frames, size)
    if method is None:
        folder = Path(out) / "original_sequences" / "youtube" / COMPRESSION / "frames" / _name(ai)
        imgs = [render(a, scene, t, size) + camera_noise(scene, t, size) for t in range(frames)]
    else:
        b = {**make_identity(seed, bi), "_index": bi}
        params = fake_params(method, _rng(seed, method, ai, bi))
        folder = Path(out) / "manipulated_sequences" / method / COMPRESSION / "frames" / f"{_name(ai)}_{_name(bi)}"
        imgs = [fake_frame(method, a, b, scene, t, size, params) for t in range(frames)]
    _save_frames(folder, imgs)


def write_benchmark(out: str | os.PathLike, videos: int = SYNTH_DEFAULTS["videos"],
                    frames: int = SYNTH_DEFAULTS["frames"], size: int = SYNTH_DEFAULTS["size"],
                    seed: int = SYNTH_DEFAULTS["seed"], workers: int = 1, methods=METHODS) -> dict:
    """Write the tree; returns the contents of ``synth.json``."""
    if frames < 1 or size < 32:
        raise ValueError(f"synth: need frames >= 1 and size >= 32, got frames={frames} size={size}")
    out = Path(out)
    splits = split_identities(videos, seed)
    pairs = {s: pairs_for(ids, seed, s) for s, ids in splits.items()}
    (out / "splits").mkdir(parents=True, exist_ok=True)
    for s, ps in pairs.items():
        (out / "splits" / f"{s}.json").write_text(json.dumps([[_name(x), _name(y)] for x, y in ps]) + "\n")
    tasks = [(str(out), seed, frames, size, None, i, -1) for i in range(videos)]
    for m in methods:
        for s in pairs:
            for x, y in pairs[s]:
                tasks += [(str(out), seed, frames, size, m, x, y), (str(out), seed, frames, size, m, y, x)]
    from tqdm import tqdm

    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_video_task, tasks), total=len(tasks), desc="synth", unit="video",
                          mininterval=_TQDM_INTERVAL):
                pass
    else:
        for t in tqdm(tasks, desc="synth", unit="video", mininterval=_TQDM_INTERVAL):
            _video_task(t)
    info = {
        "version": VERSION, "seed": seed, "videos": videos, "frames": frames, "size": size,
        "compression": COMPRESSION, "methods": list(methods),
        "split_sizes": {s: len(ids) for s, ids in splits.items()},
        "identities": {s: [_name(i) for i in ids] for s, ids in splits.items()},
        "counts": {"real": videos, "fake": videos * len(methods)},
    }
    (out / "synth.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
