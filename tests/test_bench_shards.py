"""`fdtrain bench shards`: a tiny run prints the table and writes the same JSON line it prints."""
import json

from fdtrain.cli import main


def test_bench_shards_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "shards", "--videos", "1", "--frames", "2", "--workers", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out.read_text())
    assert json.loads(printed[-1]) == result
    (row,) = result["results"]
    assert row["workers"] == 1 and row["crops"] == 2 and row["skipped"] == 0 and row["crops_per_s"] > 0
