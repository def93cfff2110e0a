"""`fdtrain bench {model,data,train,shards}`: images/s beside a baseline measured in the same run."""
from __future__ import annotations

import json
from pathlib import Path


def emit_result(result: dict, json_path: str = "") -> None:
    """Every bench ends the same way: its result as one JSON line on stdout, and in --json PATH."""
    line = json.dumps(result)
    print(line)
    if json_path:
        Path(json_path).write_text(line + "\n")
