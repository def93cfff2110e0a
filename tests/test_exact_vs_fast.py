"""launch/exact_vs_fast.sh and recipes/exact_vs_fast/ (README "Exact vs fast"): the grid is what the README says."""
import shlex
import subprocess
from pathlib import Path

from fdtrain.config import resolve

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "exact_vs_fast.sh"
# the one field each condition changes from recipes/demo.yaml ({} = the demo itself)
CHANGES = {
    "demo": {},
    "two_pass": {"model.forward": "two_pass"},
    "released": {"loss.recon_reduction": "released"},
    "shared": {"model.error_encoder": "shared"},
    "separate": {"model.error_encoder": "separate"},
    "paper_step": {"model.forward": "two_pass", "loss.recon_reduction": "released", "model.error_encoder": "shared"},
}


def _get(cfg, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_dry_run_lists_every_condition_and_seed_seeds_outermost():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--seeds", "1,2", "--out", "runs/x"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2 * len(CHANGES)
    demo = resolve(REPO / "recipes" / "demo.yaml", [])
    watched = {k for ch in CHANGES.values() for k in ch}
    seen = []
    for line in out:
        argv = shlex.split(line)
        assert argv[1:4] == ["-m", "fdtrain", "train"] and "/recipes/exact_vs_fast/" in argv[4]
        overrides = argv[5:]
        cfg = resolve(argv[4], overrides)
        cond = cfg.run.name.removeprefix("evf-")
        assert argv[4].endswith(f"/{cond}.yaml") and overrides == [
            f"--run.seed={cfg.run.seed}", f"--run.out_dir=runs/x/seed-{cfg.run.seed}", "--logging.progress=plain"]
        seen.append((cfg.run.seed, cond))
        assert cfg.run.out_dir == f"runs/x/seed-{cfg.run.seed}"
        for key in watched:
            assert _get(cfg, key) == CHANGES[cond].get(key, _get(demo, key)), (cond, key)
    assert seen == [(s, c) for s in (1, 2) for c in CHANGES]
    # and nothing else differs from the demo
    for cond, changes in CHANGES.items():
        cfg = resolve(REPO / "recipes" / "exact_vs_fast" / f"{cond}.yaml", [])
        want, got = demo.to_dict(), cfg.to_dict()
        diff = {f"{sec}.{k}" for sec in got for k in got[sec] if got[sec][k] != want[sec][k]}
        assert diff == set(changes) | {"run.name"}, (cond, diff)


def test_unknown_condition_is_refused_by_name():
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "demo,fast"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown condition 'fast'" in r.stderr
