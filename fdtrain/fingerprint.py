"""What made a result: code (git commit + dirty flag, fdtrain version), config and data hashes, and
the rule that picked the evaluated checkpoint. Written into every metrics.json and evaluation
output; `fdtrain report` warns when runs it averages differ in code or data.

No torch here (the ONNX serving path and `fdtrain report` run without it).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from fdtrain.data.format import sha256_file  # torch-free; the shard writer owns file hashing

REPO = Path(__file__).resolve().parents[1]


def git_state(repo: str | os.PathLike = REPO) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None}; None when fdtrain is not run from a git checkout.

    Dirty means tracked files differ from the commit (untracked data, runs and shards do not count).
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def manifest_info(folder: str | os.PathLike) -> dict[str, Any]:
    """{"path", "manifest_sha256"} of a shard folder; the hash is None when it has no manifest.json here."""
    manifest = Path(folder) / "manifest.json"
    return {"path": str(folder), "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None}


def data_fingerprint(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """Manifest hashes of the config's train, val and test shard sets (``cfg.to_dict()["data"]``)."""
    out: dict[str, Any] = {}
    for split in ("train", "val"):
        if data_cfg.get(split):
            out[split] = manifest_info(data_cfg[split])
    out["test"] = {name: manifest_info(path) for name, path in (data_cfg.get("test") or {}).items()}
    return out


def fingerprint(config: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of one result: ``config`` is the resolved config as a dict, ``selection``
    says how the evaluated checkpoint was chosen."""
    from fdtrain import __version__

    return {"git": git_state(), "fdtrain_version": __version__, "config_sha256": config_hash(config),
            "data": data_fingerprint(config.get("data", {})), "selection": selection}


def code_key(fp: dict[str, Any]) -> tuple:
    """What must agree for two results to come from the same code."""
    git = fp.get("git") or {}
    return (git.get("commit"), git.get("dirty"), fp.get("fdtrain_version"))


def data_key(fp: dict[str, Any]) -> tuple:
    """What must agree for two results to come from the same data: every manifest hash."""
    data = fp.get("data") or {}
    flat = [(k, (v or {}).get("manifest_sha256")) for k, v in data.items() if k != "test"]
    flat += [(f"test/{k}", (v or {}).get("manifest_sha256")) for k, v in (data.get("test") or {}).items()]
    return tuple(sorted(flat))
