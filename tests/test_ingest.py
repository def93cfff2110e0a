"""`fdtrain shards make` on tiny FF++-, Celeb-DF-, WildDeepfake- and folder-shaped trees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdtrain.data.prep.sources.celebdf import read_test_list
from fdtrain.data.prep.video import uniform_indices
from tests._data_utils import (
    CELEBDF_TEST_LIST,
    CELEBDF_VIDEOS,
    FFPP_SPLITS,
    face_frames,
    make_celebdf_tree,
    make_ffpp_tree,
    make_wdf_tree,
    noise_frames,
    read_split,
    shards_make,
    write_corrupt_video,
    write_video,
)

REPO = Path(__file__).resolve().parents[1]


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _videos(samples: dict) -> set[str]:
    return {s["json"]["video"] for s in samples.values()}


@pytest.fixture(scope="module")
def ffpp_root(tmp_path_factory):
    return make_ffpp_tree(tmp_path_factory.mktemp("ffpp"), frames=5)


@pytest.fixture(scope="module")
def ffpp_shards(ffpp_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ffpp_shards")
    rc = shards_make("--source", "ffpp", "--root", str(ffpp_root), "--out", str(out), "--methods",
                     "Deepfakes,Face2Face", "--holdout-tests", "--frames", "3", "--size", "64", "--min-shards", "2",
                     "--workers", "2")
    assert rc == 0
    return out


def test_ffpp_splits_keys_labels(ffpp_shards):
    assert sorted(p.name for p in ffpp_shards.iterdir() if not p.name.startswith(".")) == [
        "test", "test_Deepfakes", "test_Face2Face", "test_FaceSwap", "test_NeuralTextures", "train", "val"]
    frames = uniform_indices(5, 3)
    assert frames == [0, 2, 4]
    for split, pairs in FFPP_SPLITS.items():
        ids = [i for p in pairs for i in p]
        fakes = [f"{a}_{b}" for a, b in pairs] + [f"{b}_{a}" for a, b in pairs]
        want = {f"ffpp/c23/original/{i}" for i in ids}
        want |= {f"ffpp/c23/{m}/{f}" for m in ("Deepfakes", "Face2Face") for f in fakes}
        got = read_split(ffpp_shards / split)
        assert _videos(got) == want, split
        assert set(got) == {f"{v}/{f:04d}" for v in want for f in frames}
        for key, s in got.items():
            j = s["json"]
            assert s["cls"] == j["label"] == (0 if j["method"] == "original" else 1)
            assert j["split"] == split and j["dataset"] == "ffpp" and j["compression"] == "c23"
            assert key.startswith(j["video"] + "/") and j["frame"] == int(key[-4:])
            assert j["source"].endswith(j["video"].split("/")[-1] + ".mp4")
        m = _manifest(ffpp_shards / split)
        assert m["num_samples"] == len(got) == 3 * (len(ids) + 2 * len(fakes))
        assert m["counts"]["label"] == {"0": 3 * len(ids), "1": 6 * len(fakes)}
        assert m["skipped"] == [] and m["num_shards"] == 2


def test_ffpp_holdout_test_folders(ffpp_shards):
    a, b = FFPP_SPLITS["test"][0]
    for method in ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"):
        got = read_split(ffpp_shards / f"test_{method}")
        assert _videos(got) == {f"ffpp/c23/original/{a}", f"ffpp/c23/original/{b}",
                                f"ffpp/c23/{method}/{a}_{b}", f"ffpp/c23/{method}/{b}_{a}"}
        assert _manifest(ffpp_shards / f"test_{method}")["source_split"] == "test"


def test_ffpp_crops_are_square_faces_of_the_asked_size(ffpp_shards):
    from fdtrain.data.prep.video import load_rgb

    for s in list(read_split(ffpp_shards / "val").values())[:4]:
        assert load_rgb(s["image"]).shape == (64, 64, 3)
        assert s["image"][:3] == b"\xff\xd8\xff"


def test_ffpp_missing_listed_video_is_reported(tmp_path):
    root = make_ffpp_tree(tmp_path / "ff", methods=("Deepfakes",), frames=2, size=96,
                          splits={"train": [["000", "001"]], "val": [["002", "003"]], "test": [["004", "005"]]})
    (root / "manipulated_sequences/Deepfakes/c23/videos/001_000.mp4").unlink()
    out = tmp_path / "out"
    assert shards_make("--source", "ffpp", "--root", str(root), "--out", str(out), "--frames", "1",
                       "--min-shards", "1", "--splits", "train") == 0
    m = _manifest(out / "train")
    assert [s["video"] for s in m["skipped"]] == ["ffpp/c23/Deepfakes/001_000"]
    assert "listed in train.json but not found" in m["skipped"][0]["reason"]
    assert m["num_videos"] == 3 and not (out / "val").exists()


def test_ffpp_unknown_method_is_a_clear_error(ffpp_root, tmp_path, capsys):
    assert shards_make("--source", "ffpp", "--root", str(ffpp_root), "--out", str(tmp_path / "o"),
                       "--methods", "FaceShifter") == 2
    assert "method FaceShifter not found" in capsys.readouterr().err


def test_celebdf_inverted_test_list_and_identity_val(tmp_path):
    root = make_celebdf_tree(tmp_path / "cdf", frames=4)
    out = tmp_path / "out"
    assert shards_make("--source", "celebdf", "--root", str(root), "--out", str(out), "--size", "64",
                       "--min-shards", "1", "--val-percent", "50") == 0
    test = read_split(out / "test")
    # the list's 1 means real: our label 0
    want = {f"celebdf/{p.split()[1].split('.')[0]}": 1 - int(p.split()[0]) for p in CELEBDF_TEST_LIST}
    assert {s["json"]["video"]: s["cls"] for s in test.values()} == want
    train, val = read_split(out / "train"), read_split(out / "val")
    listed = set(want)
    everything = {f"celebdf/{f}/{n}" for f, ns in CELEBDF_VIDEOS.items() for n in ns}
    assert _videos(train) | _videos(val) == everything - listed
    assert _videos(train) and _videos(val) and not (_videos(train) & _videos(val))

    def ident(v: str) -> str:
        folder, name = v.split("/")[1:]
        return name if folder == "YouTube-real" else name.split("_")[0]

    assert {ident(v) for v in _videos(train)}.isdisjoint({ident(v) for v in _videos(val)})
    for s in list(train.values()) + list(val.values()):
        assert s["cls"] == (1 if s["json"]["method"] == "Celeb-synthesis" else 0)
    # 4-frame videos with the default 32 frames: every frame taken, and the manifest says so
    m = _manifest(out / "test")
    assert m["num_samples"] == 12 and len(m["short_videos"]) == 3 and m["short_videos"][0]["frames"] == 4


def test_celebdf_list_contradicting_its_folder_is_refused(tmp_path):
    p = tmp_path / "List_of_testing_videos.txt"
    p.write_text("0 Celeb-real/id0_0000.mp4\n")  # a real marked with the list's fake value
    with pytest.raises(ValueError, match=r"List_of_testing_videos.txt:1: .*writes 1 for real"):
        read_test_list(p)


def test_wdf_archives(tmp_path):
    root = tmp_path / "wdf"
    layout = make_wdf_tree(root)
    (root / "real_train" / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip" * 10)
    # an interrupted download of archive 3: sequence 3/fake/0 is whole, 3/fake/7 is cut
    whole = (root / "fake_train" / "3.tar.gz").read_bytes()
    (root / "fake_train" / "8.tar.gz").write_bytes(whole[: len(whole) * 3 // 4])
    out = tmp_path / "out"
    assert shards_make("--source", "wdf", "--root", str(root), "--out", str(out), "--frames", "2",
                       "--min-shards", "1", "--val-percent", "0") == 0
    train, test = read_split(out / "train"), read_split(out / "test")
    assert _videos(train) == {"wdf/real_train/1/1/real/0", "wdf/real_train/1/1/real/1", "wdf/real_train/2/2/real/0",
                              "wdf/fake_train/3/3/fake/0", "wdf/fake_train/3/3/fake/7", "wdf/fake_train/8/3/fake/0"}
    # two archives holding the same folder name: their keys differ by the archive name
    assert _videos(test) == {"wdf/real_test/4/4/real/0", "wdf/fake_test/5/5/fake/0", "wdf/fake_test/6/5/fake/0"}
    assert {k for k in test if k.startswith("wdf/fake_test/5/")} == {"wdf/fake_test/5/5/fake/0/0000",
                                                                       "wdf/fake_test/5/5/fake/0/0040"}
    for s in list(train.values()) + list(test.values()):
        assert s["cls"] == (0 if "/real_" in s["json"]["video"] else 1) == s["json"]["label"]
        assert s["ext"] == "jpg" and s["json"]["source"].startswith(s["json"]["video"].split("/")[1])
    assert len(train) == 6 * 2  # every sequence has >= 2 frames
    skipped = sorted(_manifest(out / "train")["skipped"], key=lambda s: s["input"])
    assert [(s["input"], s["video"]) for s in skipped] == [("fake_train/8.tar.gz", "wdf/fake_train/8/3/fake/7"),
                                                          ("real_train/broken.tar.gz", "wdf/real_train/broken")]
    assert all(s["reason"].startswith("unreadable archive") for s in skipped)
    assert "the archive's other sequences are kept" in skipped[0]["reason"]
    assert sum(layout[str(root / "fake_test/5.tar.gz")].values()) == 5


def test_folders_csv_with_failures_reported(tmp_path):
    """A corrupt video and a video with no face are reported; the other inputs land."""
    root = tmp_path / "f"
    write_video(root / "vids" / "good.mp4", face_frames(4, 128))
    write_video(root / "vids" / "noface.mp4", noise_frames(4, 128))
    write_corrupt_video(root / "vids" / "corrupt.mp4")
    from PIL import Image

    for t, fr in enumerate(face_frames(3, 64)):
        (root / "crops" / "clip1").mkdir(parents=True, exist_ok=True)
        Image.fromarray(fr).save(root / "crops" / "clip1" / f"f{t}.png")
    rows = ["path,label,video,split", "vids/good.mp4,real,good,test", "vids/noface.mp4,fake,noface,test",
            "vids/corrupt.mp4,1,corrupt,test"] + [f"crops/clip1/f{t}.png,fake,clip1,test" for t in range(3)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert shards_make("--source", "folders", "--root", str(root), "--csv", str(root / "list.csv"), "--out",
                       str(out), "--frames", "2", "--size", "48", "--min-shards", "1", "--name", "mine") == 0
    got = read_split(out / "test")
    assert _videos(got) == {"mine/real/good", "mine/fake/clip1"}
    assert sorted(got) == ["mine/fake/clip1/0000", "mine/fake/clip1/0002", "mine/real/good/0000", "mine/real/good/0003"]
    m = _manifest(out / "test")
    reasons = {s["video"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"mine/fake/noface", "mine/fake/corrupt"}
    assert reasons["mine/fake/noface"].startswith("no face found in any frame")
    assert reasons["mine/fake/corrupt"].startswith("undecodable video")


def test_folders_path_rule(tmp_path):
    from PIL import Image

    root = tmp_path / "f"
    for split, label, video in [("train", "real", "a"), ("train", "fake", "b"), ("val", "fake", "c")]:
        d = root / split / label / video
        d.mkdir(parents=True)
        for t in range(3):
            Image.fromarray(face_frames(1, 32)[0]).save(d / f"{t:03d}.jpg", quality=90)
    (root / "README.txt").write_text("not an image")
    out = tmp_path / "out"
    assert shards_make("--source", "folders", "--root", str(root), "--out", str(out), "--frames", "all",
                       "--min-shards", "1") == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["train", "val"]
    train = read_split(out / "train")
    assert sorted(train) == [f"folders/{lab}/{v}/{t:04d}" for lab, v in (("fake", "b"), ("real", "a"))
                             for t in range(3)]
    src = (root / "train/real/a/000.jpg").read_bytes()
    assert train["folders/real/a/0000"]["image"] == src  # a stored JPEG crop is kept byte for byte


def _tree_bytes(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and ".work" not in p.parts:
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                m.pop("command")
                data = json.dumps(m, sort_keys=True).encode()
            out[str(p.relative_to(d))] = data
    return out


def test_killed_run_resumes_to_the_same_shards(ffpp_root, tmp_path):
    args = ["--source", "ffpp", "--root", str(ffpp_root), "--methods", "Deepfakes", "--frames", "2", "--size", "48",
            "--min-shards", "2", "--workers", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, "FDTRAIN_INGEST_KILL_AFTER": "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fdtrain", "shards", "make", *args, "--out", str(killed),
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    done = list((killed / ".work").glob("*.json"))
    assert len(done) == 5 and not list(killed.glob("train"))
    assert shards_make(*args, "--out", str(killed)) == 0
    whole = tmp_path / "whole"
    assert shards_make(*args, "--out", str(whole)) == 0
    a, b = _tree_bytes(killed), _tree_bytes(whole)
    assert sorted(a) == sorted(b) and len(a) == 3 * 5
    for name in a:
        assert a[name] == b[name], name
    assert not (killed / ".work").exists()


def test_an_unforeseen_error_skips_that_input_only(tmp_path):
    """A plug-in detector that crashes on one frame: that video is reported, the others land."""
    root = tmp_path / "f"
    for name in ("a", "b", "c"):
        write_video(root / f"{name}.mp4", face_frames(2, 64))
    (root / "list.csv").write_text("path,label,video,split\n" + "".join(f"{n}.mp4,0,{n},test\n" for n in "abc"))
    out = tmp_path / "out"
    assert shards_make("--source", "folders", "--root", str(root), "--csv", str(root / "list.csv"), "--out", str(out),
                       "--frames", "1", "--size", "32", "--min-shards", "1",
                       "--detector", "tests._data_utils:FailingDetector") == 0
    m = _manifest(out / "test")
    assert m["num_samples"] == 2
    assert [s["reason"] for s in m["skipped"]] == ["failed: RuntimeError: detector crashed"]
