"""`fdtrain bench model` end to end at a tiny size: table, JSON line, --json file, ratios."""
from __future__ import annotations

import json

from fdtrain.cli import main


def test_bench_model_smoke(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "model", "--batch-size", "2", "--size", "64", "--steps", "1", "--warmup", "0",
               "--device", "cpu", "--json", str(path)])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("fused") for line in printed)
    result = json.loads(printed[-1])
    assert result == json.loads(path.read_text())
    assert set(result["results"]) == {"xception", "fused", "two_pass"}
    for r in result["results"].values():
        assert r["images_per_s"] > 0 and r["step_s"] > 0
    assert set(result["time_ratios"]) == {"fused_vs_xception", "two_pass_vs_xception", "two_pass_vs_fused"}
    assert result["results"]["fused"]["params"] < result["results"]["xception"]["params"]


def test_bench_model_rejects_bad_arguments(capsys):
    assert main(["bench", "model", "--models", "resnet"]) == 2
    assert "--models" in capsys.readouterr().err
