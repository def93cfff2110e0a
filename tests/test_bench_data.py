"""`fdtrain bench data` runs every row on its own small data and reports ratios to the naive baseline."""
from __future__ import annotations

import json

import pytest
import torch

from fdtrain.cli import main


def test_bench_data_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "data", "--samples", "96", "--image-size", "80", "--size", "64", "--batch-size", "16",
               "--workers", "1", "--threads", "1", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert json.loads(printed.strip().splitlines()[-1]) == result
    rows = result["results"]
    assert set(rows) == {"naive", "dali-cpu", "dali-cpu+n", "torch-w1", "torch-w1+n"}
    assert rows["naive"]["vs_naive"] == 1.0
    assert all(r["images_per_s"] > 0 and r["vs_naive"] > 0 for r in rows.values())
    assert "vs naive" in printed and "dali-cpu" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_data_refuses_cuda_without_gpu(capsys):
    assert main(["bench", "data", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
