"""The synthetic FF++-shaped benchmark: determinism, splits by identity, manipulation types, shards."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fdtrain.cli import main
from fdtrain.data.prep import synth
from tests._data_utils import read_split

VIDEOS, FRAMES, SIZE = 12, 2, 48


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "bench"
    assert main(["synth", "--out", str(root), "--videos", str(VIDEOS), "--frames", str(FRAMES), "--size", str(SIZE),
                 "--seed", "7", "--workers", "1"]) == 0
    return root


def test_deterministic_for_a_seed(tree, tmp_path):
    again = tmp_path / "again"
    synth.write_benchmark(again, videos=VIDEOS, frames=FRAMES, size=SIZE, seed=7, workers=2)
    assert _digest_tree(again) == _digest_tree(tree)
    other = tmp_path / "other"
    synth.write_benchmark(other, videos=VIDEOS, frames=1, size=SIZE, seed=8, workers=1, methods=())
    a = (tree / "original_sequences/youtube/raw/frames/000/0000.png").read_bytes()
    assert a != (other / "original_sequences/youtube/raw/frames/000/0000.png").read_bytes()


def test_splits_by_identity_in_ffpp_form(tree):
    info = json.loads((tree / "synth.json").read_text())
    pairs = {s: json.loads((tree / "splits" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    ids = {s: [i for p in ps for i in p] for s, ps in pairs.items()}
    assert {s: len(v) for s, v in ids.items()} == info["split_sizes"] == {"train": 8, "val": 2, "test": 2}
    every = [i for v in ids.values() for i in v]
    assert sorted(every) == [f"{i:03d}" for i in range(VIDEOS)]  # each identity in exactly one pair
    for s, ps in pairs.items():
        assert all(isinstance(p, list) and len(p) == 2 for p in ps)
        assert sorted(ids[s]) == info["identities"][s]
    reals = sorted(p.name for p in (tree / "original_sequences/youtube/raw/frames").iterdir())
    assert reals == sorted(every)
    for m in synth.METHODS:
        fakes = sorted(p.name for p in (tree / "manipulated_sequences" / m / "raw/frames").iterdir())
        assert fakes == sorted(f"{a}_{b}" for ps in pairs.values() for x, y in ps for a, b in ((x, y), (y, x)))
        assert len(list((tree / "manipulated_sequences" / m / "raw/frames" / fakes[0]).glob("*.png"))) == FRAMES


def _frame(tree: Path, method: str, name: str, t: int = 0) -> np.ndarray:
    from PIL import Image

    sub = "original_sequences/youtube" if method == "original" else f"manipulated_sequences/{method}"
    return np.asarray(Image.open(tree / sub / "raw/frames" / name / f"{t:04d}.png")).astype(np.float32)


def test_manipulations_leave_their_own_traces(tree):
    """Each fake shares its target's scene and differs only where its method acts, in its own way."""
    a, b = json.loads((tree / "splits/train.json").read_text())[0]
    real = _frame(tree, "original", a)
    diff = {m: np.abs(_frame(tree, m, f"{a}_{b}") - real).mean(-1) for m in synth.METHODS}
    h = SIZE
    border = np.ones((h, h), bool)
    border[h // 8: -h // 8, h // 8: -h // 8] = False
    for m, d in diff.items():
        assert d[border].mean() < 0.5, f"{m} changed the background"  # same scene, same camera noise
        assert (d > 2).mean() > 0.03, f"{m} left no trace"
    # Deepfakes and FaceSwap replace the inner face; Face2Face and NeuralTextures touch the lower face
    upper = slice(h // 4, h // 2)
    assert diff["Deepfakes"][upper].mean() > 3 * diff["NeuralTextures"][upper].mean()
    assert diff["FaceSwap"][upper].mean() > 3 * diff["NeuralTextures"][upper].mean()

    def hf(img: np.ndarray) -> float:  # detail energy: smoothing lowers it, a fine periodic texture raises it
        from scipy.ndimage import gaussian_filter

        g = img.mean(-1)
        return float(np.abs(g - gaussian_filter(g, 2.0)).mean())

    inner = (slice(int(h * 0.3), int(h * 0.7)), slice(int(h * 0.3), int(h * 0.7)))
    lower = (slice(int(h * 0.6), int(h * 0.8)), slice(h // 3, 2 * h // 3))
    assert hf(_frame(tree, "Deepfakes", f"{a}_{b}")[inner]) < 0.8 * hf(real[inner])
    # NeuralTextures adds a periodic texture and nothing else: a sharp peak in the spectrum of its
    # difference to the real frame, and no colour shift (FaceSwap's trace is one)
    d_nt = (_frame(tree, "NeuralTextures", f"{a}_{b}") - real).mean(-1)[lower]
    spec = np.abs(np.fft.fft2(d_nt - d_nt.mean()))
    assert spec.max() > 6 * np.median(spec)
    assert abs(d_nt.mean()) < 1.5
    d_fs = (_frame(tree, "FaceSwap", f"{a}_{b}") - real)[inner]
    assert np.abs(d_fs.mean(axis=(0, 1))).max() > 5


def test_shards_with_holdout_tests(tree, tmp_path):
    out = tmp_path / "shards"
    assert main(["shards", "make", "--source", "synth", "--root", str(tree), "--out", str(out), "--methods",
                 "Deepfakes,Face2Face,FaceSwap", "--holdout-tests", "--min-shards", "1", "--workers", "1",
                 "--no-progress"]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["test", "test_Deepfakes", "test_Face2Face", "test_FaceSwap", "test_NeuralTextures", "train",
                     "val"]
    train = read_split(out / "train")
    assert {s["json"]["method"] for s in train.values()} == {"original", "Deepfakes", "Face2Face", "FaceSwap"}
    assert len(train) == FRAMES * (8 + 3 * 8)
    assert next(iter(train)).startswith("synth/raw/")
    nt = read_split(out / "test_NeuralTextures")
    test_ids = [i for p in json.loads((tree / "splits/test.json").read_text()) for i in p]
    assert {s["json"]["video"] for s in nt.values()} == (
        {f"synth/raw/original/{i}" for i in test_ids}
        | {f"synth/raw/NeuralTextures/{x}_{y}" for x in test_ids for y in test_ids if x != y})
    assert {s["cls"] for s in nt.values()} == {0, 1}
    assert main(["shards", "verify", str(out)]) == 0


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even number"):
        synth.write_benchmark(tmp_path / "x", videos=7)
