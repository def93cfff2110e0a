"""`fdtrain robustness`: the DeeperForensics-1.0 distortions against independent computations, the
clean row against `fdtrain evaluate`, every (sample, condition) exactly once over two processes,
the sweep at the end of training, and clear errors for bad types and levels."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from fdtrain.data import distortions as D
from tests import _engine_utils as U
from tests._data_utils import make_shards

LEVELS = D.LEVELS


# --------------------------------------------------------------------------------------------
# The distortions on a fixed image
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A fixed natural image, 96 x 80 (H x W, not square, not a multiple of every factor)."""
    from skimage import data as skdata

    return np.asarray(Image.fromarray(skdata.astronaut()).resize((80, 96), Image.BILINEAR))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy


def _n(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def _maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def test_protocol_parameters_are_deeperforensics():
    """EndlessSora/DeeperForensics-1.0, perturbation/add_distortion_to_video.py."""
    assert [D.parameter("CS", lv) for lv in LEVELS] == [0.4, 0.3, 0.2, 0.1, 0.0]
    assert [D.parameter("CC", lv) for lv in LEVELS] == [0.85, 0.725, 0.6, 0.475, 0.35]
    assert [D.parameter("BW", lv) for lv in LEVELS] == [16, 32, 48, 64, 80]
    assert [D.parameter("GNC", lv) for lv in LEVELS] == [0.001, 0.002, 0.005, 0.01, 0.05]
    assert [D.parameter("GB", lv) for lv in LEVELS] == [7, 9, 13, 17, 21]
    assert [D.parameter("JPEG", lv) for lv in LEVELS] == [2, 3, 4, 5, 6]
    assert [D.parameter("VC", lv) for lv in LEVELS] == [30, 32, 35, 38, 40]


@pytest.mark.parametrize("level", LEVELS)
def test_colour_saturation_is_pils_colour_enhance(face, level):
    """PIL's ImageEnhance.Color blends with the ITU-R 601 grey image: the same operation, PIL
    rounds where the reference truncates: within 2 grey levels. Level 5 (p = 0) is grey."""
    p = D.parameter("CS", level)
    ours = _n(D.distort_image(_t(face), "CS", level, 0))
    ref = np.asarray(ImageEnhance.Color(Image.fromarray(face)).enhance(p))
    assert _maxdiff(ours, ref) <= 2
    if p == 0:
        assert _maxdiff(ours.max(-1), ours.min(-1)) <= 1  # R = G = B up to OpenCV's constants


@pytest.mark.parametrize("level", LEVELS)
def test_colour_contrast_is_an_intensity_scale(face, level):
    p = D.parameter("CC", level)
    ours = _n(D.distort_image(_t(face), "CC", level, 0))
    assert np.array_equal(ours, np.floor(face.astype(np.float32) * np.float32(p)).astype(np.uint8))
    ref = np.asarray(ImageEnhance.Brightness(Image.fromarray(face)).enhance(p))  # PIL rounds
    assert _maxdiff(ours, ref) <= 1


@pytest.mark.parametrize("level", LEVELS)
def test_block_wise_pastes_grey_8x8_blocks_at_seeded_positions(face, level):
    seed = D.condition_seed(42, "v/0001", "BW", level)
    ours = _n(D.distort_image(_t(face), "BW", level, seed))
    pos = D.block_positions(96, 80, D.parameter("BW", level), seed).numpy()
    assert len(pos) == D.parameter("BW", level)  # 96 px < 256: the count's floor (module doc)
    assert (pos >= 0).all() and (pos[:, 0] <= 96 - 9).all() and (pos[:, 1] <= 80 - 9).all()
    mask = np.zeros((96, 80), bool)
    for r, c in pos:
        mask[r:r + 8, c:c + 8] = True
    assert np.array_equal(ours, np.where(mask[..., None], 128, face))
    again = _n(D.distort_image(_t(face), "BW", level, seed))
    other = _n(D.distort_image(_t(face), "BW", level, D.condition_seed(42, "v/0002", "BW", level)))
    assert np.array_equal(ours, again) and not np.array_equal(ours, other)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_gaussian_noise_has_the_stated_variance_in_ycrcb(level):
    """On a mid-grey image (no clipping), the noise measured in Y / Cr / Cb has the reference's
    standard deviation (255^2/219 and 255^2/224 times sqrt(variance)) within 4 %, mean ~ 0."""
    img = np.empty((160, 160, 3), np.uint8)
    img[:] = (118, 128, 138)
    seed = D.condition_seed(0, "k", "GNC", level)
    out = D.distort_image(_t(img), "GNC", level, seed).double()
    r, g, b = out[0] - 118, out[1] - 128, out[2] - 138
    y = 0.299 * r + 0.587 * g + 0.114 * b
    sy, sc = D.gnc_scales(D.parameter("GNC", level))
    for comp, sd in ((y, sy), ((r - y) * 0.713, sc), ((b - y) * 0.564, sc)):
        assert float(comp.std()) == pytest.approx(sd, rel=0.04)
        assert abs(float(comp.mean())) < 0.6  # truncation moves the mean by up to -0.5
    assert torch.equal(D.distort_image(_t(img), "GNC", level, seed).double(), out)


@pytest.mark.parametrize("level", LEVELS)
def test_gaussian_blur_is_scipys_gaussian_filter(face, level):
    """scipy.ndimage.gaussian_filter, sigma k/6, radius k//2, mirror (= reflect-101) borders: within 1."""
    from scipy.ndimage import gaussian_filter

    k = D.parameter("GB", level)
    sigma = k / 6
    ours = _n(D.distort_image(_t(face), "GB", level, 0))
    ref = gaussian_filter(face.astype(np.float64), sigma=(sigma, sigma, 0), truncate=(k // 2) / sigma, mode="mirror")
    assert _maxdiff(ours, np.clip(np.round(ref), 0, 255)) <= 1


def _np_linear(a: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR written out: source x = (x' + 0.5) * in/out - 0.5, clamped at 0."""
    def axis(n_in, n_out):
        x = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        x0 = np.minimum(np.floor(x).astype(int), n_in - 1)
        return x0, np.minimum(x0 + 1, n_in - 1), x - x0

    y0, y1, fy = axis(a.shape[0], oh)
    x0, x1, fx = axis(a.shape[1], ow)
    a = a.astype(np.float64)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("level", LEVELS)
def test_jpeg_is_the_references_down_up_resize(face, level):
    f = D.parameter("JPEG", level)
    ours = _n(D.distort_image(_t(face), "JPEG", level, 0))
    ref = _np_linear(_np_linear(face, 96 // f, 80 // f), 96, 80)
    assert ours.shape == face.shape and _maxdiff(ours, ref) <= 1


def test_video_compression_is_h264_at_the_stated_crf(face):
    frames = [_t(np.roll(face, 2 * i, axis=1)) for i in range(5)]
    for level in (1, 5):
        crf = D.parameter("VC", level)
        clip = D.encode_h264(frames, crf)
        assert f"crf={crf}.0".encode() in clip  # x264's settings string in the stream's SEI
        out = D.video_compression(frames, crf)
        assert [o.shape for o in out] == [f.shape for f in frames] and out[0].dtype == torch.uint8


@pytest.mark.parametrize("dtype", D.TYPES)
def test_severity_increases_the_distortion(face, dtype):
    """Mean squared error against the clean image grows with the level (PSNR falls)."""
    frames = [_t(np.roll(face, 2 * i, axis=1)) for i in range(4)]
    errs = []
    for lv in LEVELS:
        if dtype == "VC":
            out = D.video_compression(frames, D.parameter("VC", lv))
            errs.append(np.mean([_mse(_n(o), _n(f)) for o, f in zip(out, frames)]))
        else:
            errs.append(_mse(_n(D.distort_image(_t(face), dtype, lv, D.condition_seed(0, "a/b/0", dtype, lv))), face))
    assert all(b > a for a, b in zip(errs, errs[1:])), errs


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def _tiny_run(root: Path) -> tuple[Path, Path]:
    """(test split of 4 videos x 4 frames at 64 px, run folder with one untrained checkpoint)."""
    from fdtrain.config import resolve
    from fdtrain.model_file import write_model_file
    from fdtrain.models import create_model_from_config

    data = make_shards(root / "test", 16, 2, seed=3, by_video=True)
    cfg = resolve(None, ["--model.input_size=64", "--model.pretrained=false", "--data.eval_batch_size=8",
                         "--data.num_workers=1", "--data.backend=torch", "--run.name=tiny"])
    torch.manual_seed(0)
    model = create_model_from_config(cfg.model)
    ckpt = root / "run" / "checkpoints" / "step-00000007"
    ckpt.mkdir(parents=True)
    write_model_file(ckpt / "model.pt", config=cfg.to_dict(), state_dict=model.state_dict(), step=7, epoch=0,
                     metrics={})
    (ckpt / "meta.json").write_text("{}")
    cfg.save(root / "run" / "config.yaml")
    return data, root / "run"


SWEEP = ["--types", "BW,GNC,VC", "--levels", "1,5", "--save-scores", "--num-workers", "1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One single-process sweep through the command line, in this process."""
    from fdtrain.cli import main

    root = tmp_path_factory.mktemp("robust")
    data, run = _tiny_run(root)
    assert main(["robustness", "--checkpoint", str(run), "--data", str(data), *SWEEP]) == 0
    return data, run, run / "robustness" / "test"


def _keys(data: Path) -> list[str]:
    from fdtrain.data.format import open_shards
    from fdtrain.data.loading.sweep_stream import catalog

    return sorted(e.key for e in catalog(open_shards(str(data), "test", need_index=False)))


def test_clean_row_equals_evaluate_and_reports_are_written(swept, tmp_path, capsys):
    from fdtrain.cli import main

    data, run, out = swept
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["results"]["test"]
    report = json.loads((out / "robustness.json").read_text())
    assert list(report) == ["clean", "BW", "GNC", "VC"]
    fp = json.loads((out / "fingerprint.json").read_text())  # fdtrain.fingerprint, as evaluate writes it
    assert fp == json.loads((tmp_path / "e.json").read_text())["fingerprint"] and fp["evaluated_data"]["test"]
    assert all(list(report[t]) == ["1", "5"] for t in ("BW", "GNC", "VC"))
    assert report["clean"].keys() == evaluated.keys() == {"frame", "video"}
    for level in ("frame", "video"):
        assert report["clean"][level].keys() == evaluated[level].keys()
        for k, v in evaluated[level].items():
            assert report["clean"][level][k] == pytest.approx(v, rel=1e-12, abs=1e-15), (level, k)
    for t in ("BW", "GNC", "VC"):
        for lv in ("1", "5"):
            assert report[t][lv]["frame"]["n"] == 16 and report[t][lv]["video"]["n"] == 4
    md = (out / "robustness.md").read_text()
    assert "| type | 1 | 2 | 3 | 4 | 5 | mean |" in md and "| VC (video compression (H.264)) |" in md
    assert "| BW (local block-wise distortion) | " in md and "| - | - | - |" in md  # levels 2-4 not run
    with Image.open(out / "robustness.png") as png:
        assert png.format == "PNG" and png.size[0] >= 400
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert "robustness/test/auc_vs_severity" in ea.Tags()["images"]
    curve = ea.Scalars("robustness/test/VC/frame_auc")
    assert [s.step for s in curve] == [0, 1, 5]
    assert curve[2].value == pytest.approx(report["VC"]["5"]["frame"]["auc"], abs=1e-6)


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_processes_score_every_sample_of_every_condition_once(swept, tmp_path):
    data, run, out = swept
    proc = U.run(U.accelerate_cmd("launch/accelerate/cpu2.yaml", "robustness", "--checkpoint", str(run), "--data",
                                  str(data), "--out", str(tmp_path), *SWEEP), timeout=600)
    assert proc.returncode == 0, U.explain(proc)
    one = json.loads((out / "scores.json").read_text())
    two = json.loads((tmp_path / "scores.json").read_text())
    assert one.keys() == two.keys() and len(one) == 7
    everything = _keys(data)
    for cond, got in two.items():
        assert sorted(got["keys"]) == everything, cond  # each sample once: none missing, none twice
        single = dict(zip(one[cond]["keys"], one[cond]["scores"]))
        # the random parts (BW blocks, GNC noise) are seeded by sample key: the same scores in any split
        for k, s in zip(got["keys"], got["scores"]):
            assert s == pytest.approx(single[k], abs=1e-5), (cond, k)


def test_bad_types_and_levels_are_refused_naming_the_valid_ones(swept, capsys):
    from fdtrain.cli import main
    from fdtrain.config import ConfigError, resolve

    data, run, _ = swept
    base = ["robustness", "--checkpoint", str(run), "--data", str(data)]
    assert main([*base, "--types", "CS,blur"]) == 2
    err = capsys.readouterr().err
    assert "unknown distortion type(s) ['blur']" in err
    assert "CS (colour saturation change), CC (" in err and "VC (video compression (H.264))" in err
    for bad in ("0-3", "6", "one"):
        assert main([*base, "--levels", bad]) == 2
        assert "valid levels are 1, 2, 3, 4, 5" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"eval\.robustness: unknown distortion type\(s\) \['GB7'\]"):
        resolve(None, ["--eval.robustness.types=GB7"])
    cfg = resolve(None, ["--eval.robustness.types=gb,vc", "--eval.robustness.levels=1,2"])
    assert cfg.eval.robustness.types == ["gb", "vc"] and cfg.eval.robustness.levels == [1, 2]


@pytest.mark.slow
def test_training_ends_with_the_sweep(easy_dataset, tmp_path):
    """eval.robustness: the trainer's final evaluation runs the sweep on every test set."""
    data = easy_dataset(train_videos=4, eval_videos=4, shards=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: rb}\neval: {robustness: {types: [CC], levels: [5]}}\n")
    proc = U.run(U.fdtrain_cmd("train", str(recipe), *U.overrides(data, tmp_path / "runs", "rb",
                                                                   **{"train.max_steps": 2, "data.backend": "torch"})))
    assert proc.returncode == 0, U.explain(proc)
    out = tmp_path / "runs" / "rb" / "robustness" / "test"
    report = json.loads((out / "robustness.json").read_text())
    assert list(report) == ["clean", "CC"] and list(report["CC"]) == ["5"]
    assert report["clean"] == U.metrics(tmp_path / "runs" / "rb")["test"]["test"]
    assert (out / "robustness.png").is_file() and "| CC (colour contrast change) | - | - | - | - |" in (
        out / "robustness.md").read_text()
