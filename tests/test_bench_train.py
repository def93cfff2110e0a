"""`fdtrain bench train`: one table, one JSON line, on the current backend and device."""
import json

import pytest

from tests import _engine_utils as U


@pytest.mark.slow
def test_bench_train_reports_images_per_second_and_data_wait(easy_dataset, tmp_path):
    data = easy_dataset(train_videos=8, eval_videos=2, shards=2)
    out = tmp_path / "bench.json"
    proc = U.run(U.fdtrain_cmd("bench", "train", "--data", str(data), "--steps", "2", "--warmup", "1",
                               "--backend", "dali", "--device", "cpu", "--json", str(out)))
    assert proc.returncode == 0, U.explain(proc)
    assert "compute only (one batch)" in proc.stdout and "end to end (dali)" in proc.stdout
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    assert result["bench"] == "train" and result["backend"] == "dali" and result["size"] == 64
    assert result["images_per_s"] > 0 and 0.0 <= result["data_wait_share"] < 1.0
    assert result["results"]["compute_only"]["images_per_s"] > 0
