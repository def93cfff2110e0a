#!/usr/bin/env bash
# README "Exact vs fast", measured: recipes/demo.yaml at its own size (96 px, batch 16, 8 epochs) for
# each condition below and each seed, then `fdtrain report` (mean ± std of in-domain and held-out
# AUC per condition) and the wall time of each run.
#
#   launch/exact_vs_fast.sh [--seeds 1,2,3] [--jobs N] [--threads T] [--only a,b] [--out DIR] [--dry-run]
#
# Conditions: the recipes in recipes/exact_vs_fast/, each recipes/demo.yaml with one switch changed
# (so each row answers one question): demo (as it is: fused, paired, shared_conv), two_pass, released,
# shared, separate, and paper_step (two_pass + released + shared: the paper recipes' step).
# Each run goes to DIR/seed-S/evf-<condition> (default DIR runs/exact_vs_fast); DIR/walls.tsv gets
# one line per run (condition, seed, exit status, wall seconds, load average); DIR/report.md the table.
# Finished runs (metrics.json present) are skipped, so the same command resumes a grid cut short.
# Cost: one demo run is ~17-20 CPU-minutes fused, more two_pass (1 thread): 9 fused runs with
# --jobs 2 --threads 1 took 1.6 h on a 2-core machine (18-24 min each, two side by side). The shards must
# exist (`make demo` makes them: shards/demo). PYTHON (default python3) runs fdtrain.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
seeds=1,2,3 jobs=1 threads=0 only="" out=runs/exact_vs_fast dry=0
while (($#)); do
    case $1 in
        --seeds) seeds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "exact_vs_fast.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

RECIPES=$REPO/recipes/exact_vs_fast
ORDER=(demo two_pass released shared separate paper_step)
conds=("${ORDER[@]}")
if [[ -n $only ]]; then
    IFS=, read -ra conds <<<"$only"
    for c in "${conds[@]}"; do
        [[ -f $RECIPES/$c.yaml ]] || { echo "exact_vs_fast.sh: --only: unknown condition '$c' (one of: ${ORDER[*]})" >&2; exit 2; }
    done
fi
IFS=, read -ra seed_list <<<"$seeds"

# one line per run: "<condition> <seed>", seeds outermost so that every condition has its first
# seed before any has its third (a grid cut short still compares all conditions)
plan=()
for s in "${seed_list[@]}"; do
    for c in "${conds[@]}"; do
        plan+=("$c $s")
    done
done

one_run() {  # condition seed
    local c=$1 s=$2
    local cmd=("$PYTHON" -m fdtrain train "$RECIPES/$c.yaml" "--run.seed=$s" "--run.out_dir=$out/seed-$s"
               "--logging.progress=plain")
    if ((dry)); then
        echo "${cmd[*]}"
        return 0
    fi
    if [[ -f $out/seed-$s/evf-$c/metrics.json ]]; then  # finished before: a grid cut short resumes
        echo "exact_vs_fast: $c seed $s: done already ($out/seed-$s/evf-$c)" >&2
        return 0
    fi
    rm -rf "$out/seed-$s/evf-$c"  # an unfinished run starts over (same seed, same result)
    mkdir -p "$out/seed-$s"
    local t0 rc=0
    t0=$(date +%s)
    if ((threads > 0)); then
        OMP_NUM_THREADS=$threads "${cmd[@]}" >"$out/seed-$s/evf-$c.log" 2>&1 || rc=$?
    else
        "${cmd[@]}" >"$out/seed-$s/evf-$c.log" 2>&1 || rc=$?
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$s" "$rc" "$(($(date +%s) - t0))" "$(cut -d' ' -f1 /proc/loadavg)" >>"$out/walls.tsv"
    echo "exact_vs_fast: $c seed $s: exit $rc, $(($(date +%s) - t0)) s" >&2
}
export -f one_run
export PYTHON RECIPES out dry threads

printf '%s\n' "${plan[@]}" | xargs -P "$jobs" -I{} bash -c 'one_run {}'
((dry)) && exit 0

mapfile -t done_runs < <(find "$out" -mindepth 3 -maxdepth 3 -path "$out/seed-*/evf-*/metrics.json" -printf '%h\n' | sort)
if ((${#done_runs[@]} == 0)); then
    echo "exact_vs_fast.sh: no finished run under $out" >&2
    exit 1
fi
"$PYTHON" -m fdtrain report "${done_runs[@]}" --out "$out/report.md"
"$PYTHON" - "$out/walls.tsv" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines() if line]
for cond in dict.fromkeys(r[0] for r in rows):
    walls = [float(r[3]) for r in rows if r[0] == cond and r[2] == "0"]
    sd = f" ± {statistics.stdev(walls):.0f}" if len(walls) > 1 else ""
    print(f"wall evf-{cond}: {statistics.mean(walls):.0f}{sd} s over {len(walls)} run(s)" if walls else f"wall evf-{cond}: no finished run")
EOF
