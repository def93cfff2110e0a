"""TensorBoard: the event files of a real run, read back with TensorBoard's own reader."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fdtrain.engine.tblog import recon_panel, roc_image
from tests import _engine_utils as U

TRAIN_SCALARS = ["loss/total", "loss/cls", "loss/rec_real", "loss/rec_fake", "lr", "grad_norm",
                 "images_per_sec", "data_wait_share", "nonfinite_skipped"]
EVAL_SCALARS = [f"eval/{s}/{lvl}/{m}" for s in ("val", "test") for lvl in ("frame", "video")
                for m in ("acc", "auc", "eer", "ap")]


def test_recon_panel_rows_and_roc_image():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    panel = recon_panel(x, x, -x, max_rows=2)  # X, X^_r, X^_f, |X^_r - X|, |X^_f - X|
    assert panel.shape == (3, 2 * 16, 5 * 16)
    assert float(panel[:, :16, 48:64].abs().max()) == 0.0  # X^_r == X: a black error map
    assert float(panel.min()) >= 0 and float(panel.max()) <= 1
    img = roc_image([0, 0.5, 1], [0, 0.9, 1], 0.9, "val")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


@pytest.mark.slow
def test_event_files_hold_scalars_images_text_and_hparams(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, proc = trained_run
    assert proc.returncode == 0, U.explain(proc)
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    missing = [t for t in TRAIN_SCALARS + EVAL_SCALARS if t not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; have {sorted(tags['scalars'])}"
    assert [e.step for e in ea.Scalars("loss/total")][:3] == [1, 4, 8]  # logging.every_steps=4 (+ step 1)
    assert ea.Scalars("lr")[0].value == pytest.approx(5e-4 / 4)  # warmup 4 steps, step 1
    assert all(0 <= e.value <= 1 for e in ea.Scalars("data_wait_share"))
    assert [e.step for e in ea.Scalars("eval/val/frame/auc")] == [16, 32, 48]  # each epoch end

    assert {"train/recon", "eval/val/roc", "eval/test/roc"} <= set(tags["images"])
    recon = ea.Images("train/recon")
    assert [e.step for e in recon] == [8, 16, 24, 32, 40, 48]  # logging.image_every=8
    panel = Image.open(io.BytesIO(recon[-1].encoded_image_string))
    assert panel.size == (5 * 64, 4 * 64)  # 5 columns x batch 4 rows of 64 px
    roc = Image.open(io.BytesIO(ea.Images("eval/test/roc")[-1].encoded_image_string))
    assert min(roc.size) > 100

    assert "config/text_summary" in tags["tensors"]
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "input_size: 64" in text
    assert set(ea.PluginTagToContent("hparams")) == {
        "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    assert any(t.startswith("hparam/test/frame/auc") for t in tags["scalars"])


def test_plain_progress_lines_when_not_a_terminal(capsys):
    from fdtrain.engine.tblog import Progress

    p = Progress(total_steps=10, start_step=0, mode="auto", enabled=True)  # pytest's stderr is no tty
    p.update(5, {"loss/total": 0.5, "lr": 1e-4, "images_per_sec": 12.0, "data_wait_share": 0.02})
    p.write("hello")
    p.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 5/10 loss 0.5000 lr 1.000e-04 img/s 12.0 data_wait 2.0% eta ")
    assert out[1] == "hello"
    quiet = Progress(total_steps=10, start_step=0, mode="bar", enabled=False)  # ranks > 0
    quiet.update(1, {})
    assert capsys.readouterr().out == ""
