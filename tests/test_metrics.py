"""Frame/video metrics against scikit-learn, a hand-built ROC, video grouping, cross-rank gather."""
from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from fdtrain.metrics import MetricAccumulator, compute_metrics, equal_error_rate, roc_points, video_key


def test_frame_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(float)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1)
    got = compute_metrics(torch.tensor(s), torch.tensor(y))["frame"]
    assert got["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert got["acc"] == pytest.approx(accuracy_score(y, s > 0.5), abs=1e-12)
    assert (got["n"], got["n_real"], got["n_fake"]) == (500, int((y == 0).sum()), int((y == 1).sum()))
    # EER: the FPR = FNR point; at a threshold that splits the set, FPR and FNR bracket it.
    fpr = [((s >= t) & (y == 0)).sum() / (y == 0).sum() for t in np.sort(s)]
    fnr = [((s < t) & (y == 1)).sum() / (y == 1).sum() for t in np.sort(s)]
    i = int(np.argmin(np.abs(np.array(fpr) - np.array(fnr))))
    assert min(fpr[i], fnr[i]) - 0.01 <= got["eer"] <= max(fpr[i], fnr[i]) + 0.01


def test_eer_on_a_constructed_roc():
    # ROC points (0,0) (0,.5) (.5,1) (1,1): FPR - FNR goes -.5 -> +.5 on the middle segment,
    # crossing halfway, at FPR = FNR = 0.25 (no ROC vertex sits there).
    scores, labels = [0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]
    assert equal_error_rate(scores, labels) == pytest.approx(0.25)
    # A crossing on a vertex: FPR = FNR = 1/4 at threshold 0.6.
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    assert equal_error_rate(scores, [0, 0, 0, 0, 1, 1, 1, 1]) == pytest.approx(0.25)
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0  # separable
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 1.0  # inverted


def test_one_class_sets_give_nan_not_a_crash():
    got = compute_metrics([0.2, 0.7, 0.4], [0, 0, 0], keys=["a/v/0000", "a/v/0001", "a/w/0000"])
    for level in ("frame", "video"):
        assert math.isnan(got[level]["auc"]) and math.isnan(got[level]["eer"]) and math.isnan(got[level]["ap"])
    assert got["frame"]["acc"] == pytest.approx(2 / 3)
    assert got["video"]["n"] == 2
    assert roc_points([0.3], [1]) == {"fpr": [], "tpr": [], "thresholds": []}
    assert math.isnan(compute_metrics([], [])["frame"]["acc"])


def test_video_key_and_grouping_keep_methods_apart():
    assert video_key("ffpp/c23/Deepfakes/000_003/0042") == "ffpp/c23/Deepfakes/000_003"
    keys = ["ffpp/c23/Deepfakes/000_003/0000", "ffpp/c23/Face2Face/000_003/0000",
            "ffpp/c23/Deepfakes/000_003/0001", "ffpp/c23/Face2Face/000_003/0001",
            "ffpp/c23/original/000/0000", "ffpp/c23/original/000/0001"]
    scores = [0.9, 0.2, 0.7, 0.4, 0.1, 0.3]
    labels = [1, 1, 1, 1, 0, 0]
    video = compute_metrics(scores, labels, keys)["video"]
    assert (video["n"], video["n_real"], video["n_fake"]) == (3, 1, 2)
    # Means: Deepfakes 0.8, Face2Face 0.3, original 0.2 -> Face2Face lands on the real side of 0.5.
    assert video["acc"] == pytest.approx(2 / 3)
    assert video["auc"] == pytest.approx(roc_auc_score([1, 1, 0], [0.8, 0.3, 0.2]))
    with pytest.raises(ValueError, match="ffpp/c23/original/000"):
        compute_metrics([0.1, 0.2], [0, 1], ["ffpp/c23/original/000/0000", "ffpp/c23/original/000/0001"])


def test_accumulator_single_process():
    rng = np.random.default_rng(1)
    s, y = rng.random(20), rng.integers(0, 2, 20)
    keys = [f"d/m/{i % 5:03d}/{i:04d}" for i in range(20)]
    y = np.array([k.split("/")[2] for k in keys]).astype(int) % 2  # one label per video
    acc = MetricAccumulator()
    for i in range(0, 20, 6):
        acc.update(torch.tensor(s[i:i + 6]), torch.tensor(y[i:i + 6]), keys[i:i + 6])
    assert acc.gather(None) is acc and len(acc) == 20
    assert acc.compute() == compute_metrics(s, y, keys)


# --------------------------------------------------------------------------------------------
# Two gloo ranks with unequal shares, as the eval loaders leave them (padding already removed).
# --------------------------------------------------------------------------------------------
SHARES = {0: (5, 0), 1: (3, 5)}  # rank: (count, offset)


def _all_data():
    rng = np.random.default_rng(3)
    keys = [f"ffpp/c23/M{i % 2}/{i % 4:03d}/{i:04d}" for i in range(8)]
    labels = np.array([int(k.split("/")[2][1]) for k in keys], dtype=float)
    return rng.random(8), labels, keys


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    s, y, k = _all_data()
    n, off = SHARES[rank]
    acc = MetricAccumulator()
    acc.update(torch.tensor(s[off:off + n]), torch.tensor(y[off:off + n]), k[off:off + n])
    acc.gather(accelerator)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"n": len(acc), "keys": acc.keys, "metrics": acc.compute()}, f)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.multiproc
def test_gather_across_two_ranks(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "res")
    torch.multiprocessing.spawn(_rank_main, args=(port, out), nprocs=2, join=True)
    s, y, k = _all_data()
    want = json.loads(json.dumps(compute_metrics(s, y, k)))
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            got = json.load(f)
        assert got["n"] == 8 and got["keys"] == k  # nothing dropped, nothing doubled, rank order
        assert got["metrics"] == want
