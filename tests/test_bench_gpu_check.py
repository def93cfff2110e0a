"""launch/gpu_check.sh on the CPU: it parses (shellcheck), its stage machinery records ok / failed /
timed-out / skipped stages as JSON lines and goes on after a failure, it installs bundled wheels
offline, and a real stage runs in --cpu-dry-run mode. The GPU stages themselves need a GPU."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_check.sh"


def _bash(script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    return found if Path(found).is_file() else None


def test_script_passes_shellcheck():
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install 'fdtrain[dev]')")
    proc = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stages_are_recorded_and_a_failure_does_not_stop_the_next(tmp_path):
    proc = _bash(f"""
        source {SCRIPT}
        OUT_DIR={tmp_path} RESULTS={tmp_path}/r.jsonl BUDGET_END=$(( $(date +%s) + 100 ))
        run_stage good 20 bash -c 'echo working; echo "{{\\"bench\\": \\"x\\", \\"images_per_s\\": 12.5}}"'
        run_stage broken 20 bash -c 'echo "Traceback: boom" >&2; exit 3'
        run_stage slow 1 sleep 30
        run_stage absent 20 bash -c 'echo "SKIP: no CUDA device"; exit 77'
        BUDGET_END=$(date +%s)
        run_stage late 20 true
        summary
    """, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["status"]) for r in rows] == [
        ("good", "ok"), ("broken", "failed"), ("slow", "timeout"), ("absent", "skipped"), ("late", "skipped")]
    assert rows[0]["result"] == {"bench": "x", "images_per_s": 12.5}
    assert rows[1]["rc"] == 3 and rows[1]["reason"] == "Traceback: boom"
    assert rows[2]["rc"] == 124 and rows[2]["seconds"] < 15
    assert rows[3]["reason"] == "no CUDA device" and "budget" in rows[4]["reason"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # failures and timeouts make the exit status 1
    table = proc.stdout[proc.stdout.index("stage "):]
    assert all(name in table for name in ("good", "broken", "slow", "absent", "late"))
    assert "5 stages: 1 ok, 2 skipped, 2 failed or timed out (broken, slow)" in table


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding the module ``name`` (as `make gpu-bundle` would fetch)."""
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for p, d in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return path


def test_missing_packages_install_offline_from_the_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _wheel(bundle, "fdtrain_probe_pkg")
    _wheel(bundle, "json")  # importable already: left alone
    proc = _bash(f"""
        source {SCRIPT}
        OUT_DIR={tmp_path}/out GPU_BUNDLE={bundle}
        mkdir -p "$OUT_DIR"
        ensure_offline_packages
        "$PYTHON" -c 'import fdtrain_probe_pkg, json; print("probe", fdtrain_probe_pkg.VALUE, json.__file__)'
    """, tmp_path, PIP_INDEX_URL="http://127.0.0.1:9/unreachable")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "installing offline" in proc.stdout and "fdtrain_probe_pkg-1.0" in proc.stdout
    assert "json-1.0" not in proc.stdout
    assert "probe 42" in proc.stdout and str(tmp_path) not in proc.stdout.split("probe 42")[1]
    assert (tmp_path / "out" / "site" / "fdtrain_probe_pkg" / "__init__.py").is_file()


def test_cpu_dry_run_runs_a_real_stage_and_skips_gpu_ones_with_a_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_BUNDLE": str(tmp_path / "none"),
           "GPU_CHECK_STAGES": "decode,fp16_nonfinite"}
    proc = subprocess.run([str(SCRIPT), "--cpu-dry-run", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["stage"]: r for r in map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())}
    assert rows["decode"]["status"] == "ok" and rows["decode"]["result"]["images_per_s"] > 0
    assert any("stand-in" in line for line in rows["decode"]["log_tail"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.jsonl", "logs.tar.gz", "summary.txt"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert {"logs/decode.log", "logs/fp16_nonfinite.log", "logs/nvidia-smi.txt"} <= set(tar.getnames())
    assert rows["fp16_nonfinite"]["status"] == "skipped" and "CUDA" in rows["fp16_nonfinite"]["reason"]
    assert "2 stages: 1 ok, 1 skipped, 0 failed" in proc.stdout
