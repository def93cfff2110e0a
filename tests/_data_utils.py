"""Tiny dataset trees for tests (FF++, Celeb-DF, WildDeepfake, folders, the synthetic benchmark).

Everything is made from scratch in a temporary folder: short videos cut from scikit-image's
astronaut photograph (a real face dlib finds), encoded with PyAV, plus the split files each
dataset ships. Shard folders come from one maker, :func:`make_shards`, which writes with fdtrain's
own shard writer (tar + DALI index + manifest); tests/conftest.py wraps it, the easy dataset and
the synthetic benchmark in session-scoped fixtures.
"""
from __future__ import annotations

import functools
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The astronaut's face in skimage.data.astronaut() (512x512), as dlib's HOG finds it.
ASTRONAUT_FACE = (175, 76, 265, 166)


@functools.lru_cache(maxsize=1)
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def face_frames(n: int = 6, size: int = 128, shift: int = 0, tint=(1.0, 1.0, 1.0)) -> list[np.ndarray]:
    """``n`` frames of ``size`` px around the astronaut's face, moving 2 px a frame from ``shift``.

    The face box in frame t is :func:`face_box_in_frame` (size, shift, t).
    """
    from PIL import Image

    img = astronaut().astype(np.float32) * np.asarray(tint, np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    out = []
    for t in range(n):
        x0, y0 = 100 + shift + 2 * t, 20 + shift
        crop = img[y0:y0 + 220, x0:x0 + 220]
        out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
    return out


def face_box_in_frame(size: int, shift: int, t: int) -> tuple[float, float, float, float]:
    x0, y0, s = 100 + shift + 2 * t, 20 + shift, size / 220
    x1, y1, x2, y2 = ASTRONAUT_FACE
    return ((x1 - x0) * s, (y1 - y0) * s, (x2 - x0) * s, (y2 - y0) * s)


def noise_frames(n: int = 6, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """Frames with no face in them."""
    r = np.random.default_rng(seed)
    base = r.integers(0, 255, (size // 8, size // 8, 3)).astype(np.uint8)
    return [np.kron(np.roll(base, t, axis=1), np.ones((8, 8, 1), np.uint8)) for t in range(n)]


def write_video(path: Path, frames: list[np.ndarray], codec: str = "mpeg4") -> Path:
    from fdtrain.data.prep.video import write_test_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_test_video(path, frames, codec=codec)
    return path


def write_corrupt_video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)  # an mp4 header, then garbage
    return path


# ---------------------------------------------------------------------------------------------
# FaceForensics++
# ---------------------------------------------------------------------------------------------
FFPP_SPLITS = {"train": [["000", "001"], ["002", "003"]], "val": [["004", "005"]], "test": [["006", "007"]]}


def make_ffpp_tree(root: Path, methods=("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"), comp: str = "c23",
                   frames: int = 5, size: int = 128, splits=None) -> Path:
    """An FF++ tree: 8 identities, their pair fakes per method, split JSONs under root/splits."""
    splits = splits or FFPP_SPLITS
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        (root / "splits" / f"{name}.json").write_text(json.dumps(pairs))
    ids = sorted({i for pairs in splits.values() for p in pairs for i in p})
    for k, i in enumerate(ids):
        write_video(root / "original_sequences" / "youtube" / comp / "videos" / f"{i}.mp4",
                    face_frames(frames, size, shift=k))
    for mi, m in enumerate(methods):
        for pairs in splits.values():
            for a, b in pairs:
                for x, y in ((a, b), (b, a)):
                    tint = (1.0, 1.0 - 0.05 * (mi + 1), 1.0)
                    write_video(root / "manipulated_sequences" / m / comp / "videos" / f"{x}_{y}.mp4",
                                face_frames(frames, size, shift=ids.index(x), tint=tint))
    return root


# ---------------------------------------------------------------------------------------------
# Celeb-DF v2
# ---------------------------------------------------------------------------------------------
CELEBDF_VIDEOS = {
    "Celeb-real": ["id0_0000", "id0_0001", "id1_0000", "id2_0000", "id3_0000"],
    "YouTube-real": ["00000", "00001"],
    "Celeb-synthesis": ["id0_id1_0000", "id1_id0_0000", "id2_id3_0000", "id3_id2_0000"],
}
# the official list writes 1 for real, 0 for fake
CELEBDF_TEST_LIST = ["1 Celeb-real/id3_0000.mp4", "1 YouTube-real/00001.mp4", "0 Celeb-synthesis/id3_id2_0000.mp4"]


def make_celebdf_tree(root: Path, frames: int = 4, size: int = 128) -> Path:
    for k, (folder, names) in enumerate(CELEBDF_VIDEOS.items()):
        for j, n in enumerate(names):
            write_video(root / folder / f"{n}.mp4", face_frames(frames, size, shift=k + j))
    (root / "List_of_testing_videos.txt").write_text("\n".join(CELEBDF_TEST_LIST) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# WildDeepfake
# ---------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_wdf_tree(root: Path, size: int = 64) -> dict:
    """Archives of face-sequence folders; returns {archive path: {sequence folder: n frames}}."""
    layout = {
        "real_train/1.tar.gz": {"1/real/0": 3, "1/real/1": 2},
        "real_train/2.tar.gz": {"2/real/0": 4},
        "fake_train/3.tar.gz": {"3/fake/0": 3, "3/fake/7": 3},
        "real_test/4.tar.gz": {"4/real/0": 2},
        "fake_test/5.tar.gz": {"5/fake/0": 5},
        # the same inner names as archive 5: keys must still differ (they start with the archive name)
        "fake_test/6.tar.gz": {"5/fake/0": 2},
    }
    r = np.random.default_rng(0)
    for arch, seqs in layout.items():
        path = root / arch
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            for seq, n in seqs.items():
                for t in range(n):
                    data = _png(r.integers(0, 255, (size, size, 3)).astype(np.uint8))
                    info = tarfile.TarInfo(f"{seq}/{t * 10}.png")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {str(root / a): s for a, s in layout.items()}


# ---------------------------------------------------------------------------------------------
# Synthetic benchmark
# ---------------------------------------------------------------------------------------------
def make_synth_shards(tmp_path: Path, videos: int = 8, frames: int = 2, size: int = 64,
                      methods: str = "Deepfakes,Face2Face,FaceSwap", holdout_tests: bool = True,
                      min_shards: int = 2, seed: int = 42, image_format: str = "jpg") -> Path:
    """A small synthetic dataset as shards, through `fdtrain synth` and `fdtrain shards make`:
    ``<returned>/{train,val,test,test_<Method>...}``.

    With the defaults: 8 identities (train 4, val 2, test 2), 2 frames each, 64 px crops;
    train holds 4 x 2 real + 3 x 4 x 2 fake samples. About 2-3 s on one core.
    """
    from fdtrain.cli import main

    tree, out = tmp_path / "synth_tree", tmp_path / "synth_shards"
    if not (tree / "synth.json").exists():
        assert main(["synth", "--out", str(tree), "--videos", str(videos), "--frames", str(frames), "--size", str(size),
                     "--seed", str(seed), "--workers", "1"]) == 0, "fdtrain synth failed"
    args = ["shards", "make", "--source", "synth", "--root", str(tree), "--out", str(out),
            "--workers", "1", "--min-shards", str(min_shards), "--no-progress", "--format", image_format]
    args += ["--methods", methods] if methods else []  # "": the command's default (every method)
    rc = main(args + (["--holdout-tests"] if holdout_tests else []))
    assert rc == 0, f"shards make failed ({rc})"
    return out


# ---------------------------------------------------------------------------------------------
# Shards for loader and engine tests
# ---------------------------------------------------------------------------------------------
FRAMES_PER_VIDEO = 4


def crop_jpeg(rng: np.random.Generator, size: int, *, fake: bool = False, image_ext: str = "jpg") -> bytes:
    """A face-crop stand-in: a smooth random colour field with grain, JPEG q95 without chroma
    subsampling (or PNG). A fake carries a faint checkerboard in its centre (a high-frequency trace,
    like an upsampling artefact), so a 64-px FakeDiffer separates the classes within a few dozen
    CPU steps."""
    from PIL import Image

    small = rng.integers(30, 226, (5, 5, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 4, img.shape)
    if fake:
        yy, xx = np.mgrid[0:size, 0:size]
        checker = np.where(((yy // 2) + (xx // 2)) % 2 == 0, 1.0, -1.0)[..., None]
        a, b = size // 4, 3 * size // 4
        img[a:b, a:b] += 22.0 * checker[a:b, a:b]
    buf = io.BytesIO()
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if image_ext == "jpg":
        pil.save(buf, "JPEG", quality=95, subsampling=0)
    else:
        pil.save(buf, "PNG")
    return buf.getvalue()


def sample_keys(n: int, method: str = "Deepfakes") -> list[str]:
    """The keys :func:`make_shards` gives n samples without ``by_video``: FF++-shaped, 4 frames a video."""
    return [f"ffpp/c23/{method}/{k // 4:03d}_{k // 4 + 500:03d}/{k % 4 * 10:04d}" for k in range(n)]


def _corrupted(sample, how: str | Callable):
    """``how``: "truncated" (the first half of the image), "garbage" (not an image), or a function
    Sample -> Sample for any other damage (a bad label, a missing member...)."""
    import dataclasses

    if callable(how):
        return how(sample)
    if how == "truncated":
        return dataclasses.replace(sample, image=sample.image[: len(sample.image) // 2])
    if how == "garbage":
        return dataclasses.replace(sample, image=b"this is not an image " * 20)
    raise ValueError(f"unknown corruption {how!r}")


def make_shards(out: str | Path, n: int, n_shards: int, *, size: int = 64, seed: int = 0, split: str | None = None,
                by_video: bool = False, real_every: int = 2, image_ext: str = "jpg",
                corrupt: dict[int, str | Callable] | None = None, index: bool = True) -> Path:
    """A split folder of ``n`` samples in ``n_shards`` (balanced) shards, written by fdtrain's shard writer.

    Default layout (loader tests: known order and labels): keys :func:`sample_keys` (n) in that
    order, sample k real when ``k % real_every == 0``. ``by_video``: n // 4 videos of 4 frames,
    every other video fake, samples shuffled across the shards (engine tests: a learnable split).
    ``corrupt`` maps a sample's position in the split to a damage (see :func:`_corrupted`);
    ``index=False`` leaves the DALI index files out.
    """
    from fdtrain.data.format import Sample, write_split

    out = Path(out)
    split = split or out.name
    rng = np.random.default_rng(seed)
    samples = []
    if by_video:
        for v in range(n // FRAMES_PER_VIDEO):
            fake = v % 2 == 1
            method = "Checker" if fake else "youtube"
            video = f"easy/{split}/{method}/{v:03d}"
            for f in range(FRAMES_PER_VIDEO):
                key = f"{video}/{f:04d}"
                meta = {"key": key, "dataset": "easy", "split": split, "method": method, "compression": "raw",
                        "video": video, "frame": f, "label": int(fake), "source": f"{video}/{f}.png"}
                samples.append(Sample(key, crop_jpeg(rng, size, fake=fake, image_ext=image_ext), image_ext,
                                      int(fake), meta))
        samples = [samples[i] for i in rng.permutation(len(samples))]
    else:
        for k, key in enumerate(sample_keys(n)):
            label = int(k % real_every != 0)
            video = key.rsplit("/", 1)[0]
            meta = {"key": key, "dataset": "ffpp", "split": split, "method": "Deepfakes", "compression": "c23",
                    "video": video, "frame": int(key[-4:]), "label": label, "source": f"synthetic/{k}.png"}
            samples.append(Sample(key, crop_jpeg(rng, size, fake=bool(label), image_ext=image_ext), image_ext,
                                  label, meta))
    samples = [_corrupted(s, corrupt[k]) if k in (corrupt or {}) else s for k, s in enumerate(samples)]
    counts = [len(samples) // n_shards + (i < len(samples) % n_shards) for i in range(n_shards)]
    write_split(samples, out, counts, {"command": "tests/_data_utils.py make_shards", "skipped": []})
    if not index:
        for idx in out.glob("shard-*.idx"):
            idx.unlink()
    return out


def write_easy_dataset(root: str | Path, *, train_videos: int = 16, eval_videos: int = 8, shards: int = 4) -> Path:
    """``root/{train,val,test}`` of :func:`make_shards` ``by_video``: 64 / 32 / 32 frames by default."""
    root = Path(root)
    for split, videos, seed in (("train", train_videos, 1), ("val", eval_videos, 2), ("test", eval_videos, 3)):
        make_shards(root / split, videos * FRAMES_PER_VIDEO, shards, split=split, seed=seed, by_video=True)
    return root


def small_cfg(train: str | Path = "", val: str | Path = "", **data: object):
    """A config for tiny loaders: 64-px model input, small batches, 1 thread, 0 workers."""
    from fdtrain.config import from_dict

    d = {"train": str(train), "val": str(val), "batch_size": 4, "eval_batch_size": 4, "num_workers": 0,
         "num_threads": 1, "prefetch": 1, "shuffle_buffer": 16, "noise_std": 0.1}
    d.update(data)
    return from_dict({"run": {"seed": 3}, "model": {"input_size": 64}, "data": d})


def read_split(split_dir: Path) -> dict[str, dict]:
    """{key: {"image": bytes, "ext", "cls": int, "json": dict}} of every sample of a split folder."""
    from fdtrain.data.format import IMAGE_EXTS, iter_tar_samples

    out = {}
    for tar in sorted(Path(split_dir).glob("shard-*.tar")):
        for key, parts in iter_tar_samples(tar):
            ext = next(e for e in IMAGE_EXTS if e in parts)
            assert key not in out, f"duplicate key {key}"
            out[key] = {"image": parts[ext], "ext": ext, "cls": int(parts["cls"]), "json": json.loads(parts["json"])}
    return out


def shards_make(*args: str) -> int:
    """`fdtrain shards make ...` in this process, one worker, no progress bar."""
    from fdtrain.cli import main

    return main(["shards", "make", *args, "--no-progress"] + ([] if "--workers" in args else ["--workers", "1"]))


class FailingDetector:
    """A detector plug-in that fails on its second frame (``--detector tests._data_utils:FailingDetector``)."""

    def __init__(self):
        self.calls = 0

    def detect(self, rgb, *, video="", frame=0, **info):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("detector crashed")
        h, w = rgb.shape[:2]
        return [((0.0, 0.0, float(w), float(h)), 1.0)]
