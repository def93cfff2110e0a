#!/usr/bin/env bash
# Start (or stop) a single-node SLURM cluster on this machine, for tests and for trying
# slurm/*.sbatch without a real cluster. No systemd needed: munged, slurmctld and slurmd are
# started by hand from a minimal slurm.conf kept in a state folder.
#
#   launch/slurm_local.sh [start]   install if missing, start, wait until the node is idle
#   launch/slurm_local.sh stop      shut slurmctld/slurmd down, then munged if this script started it
#   launch/slurm_local.sh status    0 when the controller answers and the node is usable
#   launch/slurm_local.sh env       print the `export SLURM_CONF=...` line for clients
#
# Idempotent: `start` on a running cluster only checks it. Exit status 3: SLURM is missing and
# cannot be installed here (not root, no apt-get, no package source); tests skip on it. Environment:
#   FDTRAIN_SLURM_DIR   state folder (default /tmp/fdtrain-slurm): slurm.conf, logs, spool, state
#   FDTRAIN_SLURM_PORT  slurmctld port (default 6817; slurmd uses the next one)
# Clients (sbatch, squeue, scontrol) find the cluster through SLURM_CONF; /etc/slurm/slurm.conf is
# linked to the generated file too when no other slurm.conf is installed there.
set -euo pipefail

STATE=${FDTRAIN_SLURM_DIR:-/tmp/fdtrain-slurm}
PORT=${FDTRAIN_SLURM_PORT:-6817}
CONF=$STATE/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }
cannot_install() { log "cannot install SLURM: $*"; exit 3; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif sudo -n true 2>/dev/null; then sudo -n "$@"; else
        die "need root (or password-less sudo) for: $*"; fi
}

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || cannot_install "${missing[*]} missing and apt-get is not available"
    [[ $(id -u) -eq 0 ]] || sudo -n true 2>/dev/null || cannot_install "${missing[*]} missing; installing needs root"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    local pkgs=(slurmctld slurmd slurm-client munge)
    # Package scripts try to start the services; without systemd that fails harmlessly.
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; then
        as_root apt-get update >&2 || cannot_install "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2 ||
            cannot_install "apt-get install ${pkgs[*]} failed"
    fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return 0
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        as_root install -d -o munge -g munge -m 0700 /etc/munge
        as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        as_root chown munge:munge /etc/munge/munge.key
        as_root chmod 0400 /etc/munge/munge.key
    fi
    as_root install -d -o munge -g munge -m 0755 /run/munge
    as_root install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # munged refuses to run as root; it must own its key and socket folder.
    as_root runuser -u munge -- /usr/sbin/munged
    touch "$STATE/started-munged"
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

write_conf() {
    local host node_line cpus mem
    host=$(hostname -s)
    # The node's real topology, so slurmd does not mark it invalid; memory a little under the
    # machine's so the node is never drained for having less than declared.
    node_line=$(PATH=$PATH:/usr/sbin slurmd -C | head -n1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    mem=$((mem * 9 / 10))
    node_line=$(sed -e "s/RealMemory=[0-9]*/RealMemory=$mem/" -e 's/^NodeName=[^ ]*//' <<<"$node_line")
    cat >"$CONF.tmp" <<EOF
# Written by launch/slurm_local.sh: a one-node cluster on this machine.
ClusterName=fdtrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
SlurmUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups here (containers, CI): track processes by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 $node_line State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    # Let plain `sbatch` find this cluster unless the machine has a slurm.conf of its own.
    if [[ ! -e $ETC_CONF || ( -L $ETC_CONF && $(readlink "$ETC_CONF") == */slurm.conf ) ]]; then
        as_root ln -sfn "$CONF" "$ETC_CONF"
    fi
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

cluster_up() {
    pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" && scontrol ping >/dev/null 2>&1
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            down* | drain* | fail*)
                scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node not idle after 60 s (state '${state:-none}'); logs in $STATE/log/"
}

cmd_start() {
    install_packages
    export PATH=$PATH:/usr/sbin
    mkdir -p "$STATE"/{state,spool,log}
    start_munge
    if cluster_up; then
        wait_idle
        log "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    # A half-started cluster (one daemon left over) is restarted as a whole.
    cmd_stop_daemons
    write_conf
    slurmctld -f "$CONF"
    for _ in $(seq 60); do scontrol ping >/dev/null 2>&1 && break; sleep 0.25; done
    scontrol ping >/dev/null 2>&1 || die "slurmctld did not answer; see $STATE/log/slurmctld.log"
    slurmd -f "$CONF"
    wait_idle
    log "up: node $(hostname -s) $(node_state); export SLURM_CONF=$CONF"
}

cmd_stop_daemons() {
    if pid_alive "$STATE/slurmctld.pid"; then
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    local pidfile
    for pidfile in "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
        for _ in $(seq 40); do pid_alive "$pidfile" || break; sleep 0.25; done
        if pid_alive "$pidfile"; then kill "$(cat "$pidfile")" 2>/dev/null || true; sleep 1; fi
        rm -f "$pidfile"
    done
}

cmd_stop() {
    export PATH=$PATH:/usr/sbin
    [[ -d $STATE ]] || { log "not running"; return 0; }
    cmd_stop_daemons
    # munged goes last: slurm's shutdown needs it to authenticate.
    if [[ -e $STATE/started-munged && -s /run/munge/munged.pid ]]; then
        as_root kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE/started-munged"
    fi
    log "stopped"
}

case ${1:-start} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) export PATH=$PATH:/usr/sbin; cluster_up && [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]] ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 [start|stop|status|env]" ;;
esac
