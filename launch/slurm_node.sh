#!/usr/bin/env bash
# One node's share of a SLURM job: start the launcher (accelerate or torchrun) that starts this
# node's training processes. slurm/train.sbatch runs it through `srun` as one task per node; it
# sets the environment and passes "$@" through to `fdtrain`, and holds no hyperparameters.
#
#   launch/slurm_node.sh SUBCOMMAND [ARGS...]      e.g.  train recipes/demo.yaml --resume auto
#
# Environment (all optional; sbatch exports the submitter's environment):
#   FDTRAIN_LAUNCHER         accelerate (default) | torchrun
#   FDTRAIN_LAUNCH_CONFIG    accelerate config; default by shape: 1 node x 1 process gpu1.yaml,
#                            1 node multi_gpu gpu8.yaml, several nodes multinode.yaml, CPU mode cpu2.yaml
#   FDTRAIN_CPU=1            CPU test mode: 2 processes per node on the CPU (gloo), no GPU needed
#   FDTRAIN_PROCS_PER_NODE   processes per node (default: the GPUs SLURM gave this node; 2 in CPU mode)
#   FDTRAIN_PYTHON           interpreter with fdtrain installed (default .venv/bin/python, else python3)
#   MASTER_ADDR MASTER_PORT  rendezvous, set by slurm/train.sbatch from the job's first node
#   FDTRAIN_DRY_RUN=1        print the launcher command line and exit (checks a setup, used by tests)
#
# The launcher runs under `python -m fdtrain.launch` (fdtrain/launch.py), which owns the signals:
# SIGUSR1/SIGTERM from SLURM (srun delivers them to every process of the step) reach every worker
# once, the workers checkpoint and exit 75, and the exit status is the workers' own (75, 2, 3)
# rather than the launcher's 1. The batch script requeues on 75.
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: $0 SUBCOMMAND [ARGS...]" >&2; exit 2; }

nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
node_rank=${SLURM_NODEID:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
launcher=${FDTRAIN_LAUNCHER:-accelerate}

if [[ -n ${FDTRAIN_PYTHON:-} ]]; then
    python=$FDTRAIN_PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

gpus_on_node() {
    # SLURM_GPUS_ON_NODE is set when the job asked for GPUs; nvidia-smi is the fallback.
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

if [[ ${FDTRAIN_CPU:-0} == 1 ]]; then
    procs=${FDTRAIN_PROCS_PER_NODE:-2}
    default_config=launch/accelerate/cpu2.yaml
    # Gloo ranks share the node's cores; oversubscribed threads make every rank slower.
    cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / procs > 0 ? cpus / procs : 1 ))}
else
    procs=${FDTRAIN_PROCS_PER_NODE:-$(gpus_on_node)}
    if [[ $procs -lt 1 ]]; then
        echo "slurm_node.sh: no GPU on $(hostname -s); ask for GPUs (--gpus-per-node) or set FDTRAIN_CPU=1" >&2
        exit 2
    fi
    if [[ $nnodes -gt 1 ]]; then
        default_config=launch/accelerate/multinode.yaml
    elif [[ $procs -eq 1 ]]; then
        default_config=launch/accelerate/gpu1.yaml
    else
        default_config=launch/accelerate/gpu8.yaml
    fi
fi
config=${FDTRAIN_LAUNCH_CONFIG:-$default_config}

case $launcher in
    accelerate)
        [[ -f $config ]] || { echo "slurm_node.sh: accelerate config not found: $config" >&2; exit 2; }
        cmd=("$python" -m fdtrain.launch accelerate --config_file "$config"
            --num_machines "$nnodes" --machine_rank "$node_rank" --num_processes $((nnodes * procs))
            --main_process_ip "$master_addr" --main_process_port "$master_port"
            -m fdtrain "$@")
        ;;
    torchrun)
        cmd=("$python" -m fdtrain.launch torchrun --nnodes "$nnodes" --node_rank "$node_rank"
            --nproc_per_node "$procs" --master_addr "$master_addr" --master_port "$master_port"
            -m fdtrain "$@")
        ;;
    *)
        echo "slurm_node.sh: FDTRAIN_LAUNCHER must be accelerate or torchrun, got '$launcher'" >&2
        exit 2
        ;;
esac

echo "slurm_node.sh: node $node_rank/$nnodes on $(hostname -s), $procs process(es), rendezvous $master_addr:$master_port" >&2
echo "slurm_node.sh: ${cmd[*]}" >&2
if [[ ${FDTRAIN_DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi

# exec: the launcher wrapper takes this shell's place, so the signals srun delivers reach it
# directly and its exit status is the task's.
exec "${cmd[@]}"
