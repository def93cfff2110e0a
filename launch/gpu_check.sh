#!/usr/bin/env bash
# One prepared GPU check of fdtrain on a bare GPU node without network (about 5 minutes on an H200).
#
#   launch/gpu_check.sh [--cpu-dry-run] [OUT_DIR]        (OUT_DIR default: ${OUT:-gpu_check})
#
# Stages, each under its own `timeout`, each appending one JSON line to OUT_DIR/gpu_check.jsonl (with
# its result and the tail of its log); a failing stage does not stop the next; one summary table at
# the end (also OUT_DIR/summary.txt). Full logs: OUT_DIR/logs.tar.gz. Three files in all, so that a
# runner that brings back only a few files from OUT_DIR gets everything.
#   preflight        GPU, driver, Python, torch/CUDA/cuDNN/NCCL, which optional packages import
#   model_*          `fdtrain bench model`, batch 32, 299 px, xception/fused/two_pass: bf16 and fp16,
#                    channels_last vs contiguous, eager vs torch.compile
#   train_torch      `fdtrain bench train` on generated shards, torch fallback loader: compute-only vs
#                    end-to-end images/s, data-wait share, peak memory
#   sync_audit       5 training steps under torch.cuda.set_sync_debug_mode("warn"): none allowed in
#                    train_step; sync_audit_paper: the same for the paper's two_pass/released step (its
#                    class split takes the loader's host-made class rows)
#   fp16_nonfinite   the GPU tests of tests/test_hot_path.py (fp16 with Accelerate's grad scaler)
#   decode           DALI mixed when DALI imports, else torchvision.io.decode_jpeg on CUDA (reason printed)
#
# Offline: packages fdtrain needs that the node lacks (webdataset, braceexpand) are installed from
# the wheels `make gpu-bundle` put in gpu_bundle/ (pip --no-index, into a temporary folder); nothing is
# ever fetched. --cpu-dry-run runs the same machinery on a CPU with tiny sizes, skipping what needs
# a GPU (with the reason). Environment: PYTHON, GPU_BUNDLE (gpu_bundle), GPU_CHECK_STAGES (comma
# list, default all), GPU_CHECK_BUDGET (seconds for all stages, default 540: one 10-minute call).
# Exit status: 0 when no stage failed or timed out, else 1.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SKIP_RC=77

# ---- machinery (sourced by tests/test_bench_gpu_check.py) ------------------------------------------
# run_stage NAME LIMIT_S CMD...: run CMD under `timeout`, log to $LOGS/NAME.log, append a JSON
# line to $RESULTS. Status: ok (0), skipped (77, or the budget is spent), timeout (124/137), failed.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_END - $(date +%s)))
    local log="${LOGS:-$OUT_DIR}/$name.log"
    if ((left < 15)); then
        echo "SKIP: the check's time budget (GPU_CHECK_BUDGET) is spent" >"$log"
        _record "$name" skipped "$SKIP_RC" 0 "$log"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    local status=failed
    case $rc in
        0) status=ok ;;
        "$SKIP_RC") status=skipped ;;
        124 | 137) status=timeout ;;
    esac
    tail -n 15 "$log" | sed 's/^/   | /'
    _record "$name" "$status" "$rc" "$secs" "$log"
}

# _record NAME STATUS RC SECONDS LOG: one JSON line; "result" is the last JSON object the stage
# printed, "reason" the SKIP line or the last line of the log.
_record() {
    "$PYTHON" - "$RESULTS" "$@" <<'EOF' || echo "{\"stage\": \"$2\", \"status\": \"$3\", \"rc\": $4}" >>"$1"
import json, sys
results, name, status, rc, secs, log = sys.argv[1:7]
lines = open(log, errors="replace").read().splitlines()
result = None
for line in reversed(lines):
    if line.startswith("{"):
        try:
            result = json.loads(line)
            break
        except ValueError:
            pass
reason = next((ln[5:].strip() for ln in lines if ln.startswith("SKIP:")), None)
if reason is None and status != "ok":
    reason = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")[-300:]
rec = {"stage": name, "status": status, "rc": int(rc), "seconds": float(secs), "reason": reason,
       "result": result, "log": log.rsplit("/", 1)[-1], "log_tail": lines[-30:]}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
EOF
}

# summary: one table of every stage in $RESULTS, the key figure of each.
summary() {
    "$PYTHON" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]

def figure(r):
    res = r.get("result") or {}
    if r["status"] != "ok":
        return (r.get("reason") or "")[:90]
    if res.get("bench") == "model":
        f = ", ".join(f"{n} {v['images_per_s']:.0f}" for n, v in res["results"].items())
        return f"img/s: {f}" + (f"; peak {res['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in res else "")
    if res.get("bench") == "train":
        c = res["results"]["compute_only"]["images_per_s"]
        s = (f"e2e {res['images_per_s']:.0f} img/s, compute-only {c:.0f}, "
             f"data wait {100 * res['data_wait_share']:.1f}%")
        return s + (f", peak {res['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in res else "")
    if "train_step_syncs" in res:
        return f"syncs in train_step {res['train_step_syncs']}, in loader {res['loader_syncs']}"
    if "decoder" in res:
        return f"{res['decoder']}: {res['images_per_s']:.0f} img/s"
    if "torch" in res and "packages" in res:
        missing = [m for m, v in res["packages"].items() if not v]
        return (f"{res.get('gpu', 'no GPU')}, torch {res['torch']} (CUDA {res['torch_cuda']}), "
                f"cuDNN {res.get('cudnn')}, NCCL {res.get('nccl')}; missing: {', '.join(missing) or 'none'}")
    return ""

print()
print(f"{'stage':<24} {'status':<8} {'seconds':>8}  key figure / reason")
for r in rows:
    print(f"{r['stage']:<24} {r['status']:<8} {r['seconds']:>8.1f}  {figure(r)}")
bad = [r["stage"] for r in rows if r["status"] in ("failed", "timeout")]
print(f"\n{len(rows)} stages: {sum(r['status'] == 'ok' for r in rows)} ok, "
      f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {len(bad)} failed or timed out"
      + (f" ({', '.join(bad)})" if bad else ""))
sys.exit(1 if bad else 0)
EOF
}

# ensure_offline_packages: install the bundle's wheels whose module does not import (no network).
ensure_offline_packages() {
    local bundle=${GPU_BUNDLE:-$REPO/gpu_bundle} site="${WORK:-$OUT_DIR}/site" wheels=() whl mod
    shopt -s nullglob
    for whl in "$bundle"/*.whl; do
        mod=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
        "$PYTHON" -c "import $mod" >/dev/null 2>&1 || wheels+=("$whl")
    done
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        echo "gpu_check: offline packages: nothing to install (bundle: $bundle)"
        return 0
    fi
    echo "gpu_check: installing offline from $bundle: ${wheels[*]##*/}"
    PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target "$site" "${wheels[@]}" || echo "gpu_check: offline install failed (see above)" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

stage_enabled() {
    [[ -z "${GPU_CHECK_STAGES:-}" ]] && return 0
    [[ ",$GPU_CHECK_STAGES," == *",$1,"* ]]
}

main() {
    local dry=0
    if [[ "${1:-}" == "--cpu-dry-run" ]]; then
        dry=1
        shift
    fi
    OUT_DIR=${1:-${OUT:-gpu_check}}
    mkdir -p "$OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    RESULTS="$OUT_DIR/gpu_check.jsonl"
    : >"$RESULTS"
    WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
    LOGS="$WORK/logs"
    mkdir -p "$LOGS"
    BUDGET_END=$(($(date +%s) + ${GPU_CHECK_BUDGET:-540}))
    cd "$REPO" || exit 1
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
    fi
    export PYTHON PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    # never the network: pip, Hugging Face and timm stay offline
    export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
    ensure_offline_packages
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$LOGS/nvidia-smi.txt" 2>&1 \
        || echo "nvidia-smi: not available" >"$LOGS/nvidia-smi.txt"
    echo "gpu_check: $(head -n 1 "$LOGS/nvidia-smi.txt"); results in $RESULTS"

    local fd=("$PYTHON" -m fdtrain) gc=("$PYTHON" -m fdtrain.bench.gpu_check)
    local dev=cuda b=32 s=299 steps=20 warm=5 tsteps=40 twarm=5 threads=8 skip_gpu=() dec=()
    if ((dry)); then  # the same commands, tiny and on the CPU (one thread: a shared CPU stalls on more)
        export OMP_NUM_THREADS=1
        dev=cpu b=2 s=64 steps=1 warm=0 tsteps=2 twarm=1 threads=1 dec=(--size 64 --batch-size 8 --rounds 1)
        skip_gpu=(bash -c "echo 'SKIP: --cpu-dry-run: needs a CUDA GPU'; exit $SKIP_RC")
        gc+=(--cpu-dry-run)
    fi
    local model=("${fd[@]}" bench model --device "$dev" --batch-size "$b" --size "$s" --steps "$steps" --warmup "$warm")
    local precisions=(bf16 fp16)
    ((dry)) && precisions=(fp32)
    stage_enabled preflight && run_stage preflight 90 "${gc[@]:0:3}" preflight "${gc[@]:3}"
    for prec in "${precisions[@]}"; do
        stage_enabled "model_${prec}_channels_last" && run_stage "model_${prec}_channels_last" 150 \
            "${model[@]}" --precision "$prec" --memory-format channels_last
    done
    local p0=${precisions[0]}
    stage_enabled "model_${p0}_contiguous" && run_stage "model_${p0}_contiguous" 150 \
        "${model[@]}" --precision "$p0" --memory-format contiguous
    if ((dry)); then
        stage_enabled "model_${p0}_compiled" && run_stage "model_${p0}_compiled" 10 bash -c \
            "echo 'SKIP: --cpu-dry-run: compile on the CPU is covered by tests/test_hot_path.py'; exit $SKIP_RC"
    else
        stage_enabled model_bf16_compiled && run_stage model_bf16_compiled 300 \
            "${model[@]}" --precision bf16 --memory-format channels_last --models xception,fused --compile
    fi
    stage_enabled train_torch && run_stage train_torch 300 "${fd[@]}" bench train --device "$dev" --backend torch \
        --batch-size "$b" --size "$s" --steps "$tsteps" --warmup "$twarm" --threads "$threads" \
        --precision "${p0/fp32/no}"
    local audit=(sync-audit "${gc[@]:3}" --size 128 --batch-size 16)  # syncs do not depend on the size
    stage_enabled sync_audit && run_stage sync_audit 180 "${gc[@]:0:3}" "${audit[@]}"
    stage_enabled sync_audit_paper && run_stage sync_audit_paper 180 "${gc[@]:0:3}" "${audit[@]}" \
        --forward two_pass --recon-reduction released
    if ((dry)); then
        stage_enabled fp16_nonfinite && run_stage fp16_nonfinite 10 "${skip_gpu[@]}"
    else
        stage_enabled fp16_nonfinite && run_stage fp16_nonfinite 240 "$PYTHON" -m pytest -q -p no:cacheprovider \
            -m gpu tests/test_hot_path.py
    fi
    stage_enabled decode && run_stage decode 180 "${gc[@]:0:3}" decode "${gc[@]:3}" "${dec[@]}"
    local rc=0
    summary | tee "$OUT_DIR/summary.txt" || rc=1
    tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs
    [[ -z "${GPU_CHECK_WORK:-}" ]] && rm -rf "$WORK"
    return $rc
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
