"""`fdtrain bench serve`: PyTorch vs ONNX Runtime at a tiny size, one JSON line."""
import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # as in test_serving.py


def test_bench_serve_reports_both_paths(tmp_path, capsys):
    from fdtrain.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "serve", "--size", "64", "--batch-size", "2", "--batches", "1", "--warmup", "0",
                 "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"pytorch", "onnxruntime"} and result["size"] == 64
    assert all(r["images_per_s"] > 0 for r in result["results"].values())
    assert result["max_score_diff"] < 1e-5
    assert "onnxruntime / pytorch speed" in capsys.readouterr().out
