#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for CI and for trying launch/slurm/train.sbatch.
#
#   sudo launch/slurm/local_cluster.sh up       # install if needed, configure, start, wait idle
#   export SLURM_CONF=/tmp/llama_jax_slurm/slurm.conf   # (printed by `up`)
#   srun -n 2 hostname
#   sbatch --wait -n 2 launch/slurm/train.sbatch configs/tiny.py
#   sudo launch/slurm/local_cluster.sh down     # stop the daemons this script started
#
# Commands: install | up | down | status. Runs as root; needs no systemd (the daemons are started
# directly). Debian/Ubuntu packages: slurmctld slurmd slurm-client munge (installed with apt-get
# when missing). No cgroups: proctrack/linuxproc, task/none, no accounting. Everything the
# cluster writes (config, state, logs, pid files) is under $LLAMA_JAX_SLURM_DIR
# (default /tmp/llama_jax_slurm); /etc/slurm/slurm.conf is linked to our config only if absent.
set -euo pipefail

DIR=${LLAMA_JAX_SLURM_DIR:-/tmp/llama_jax_slurm}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
TIMEOUT=${LLAMA_JAX_SLURM_TIMEOUT:-60}

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

have_slurm() { command -v srun >/dev/null && command -v slurmctld >/dev/null &&
               command -v slurmd >/dev/null && command -v munged >/dev/null; }

install() {
    if have_slurm; then return 0; fi
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get"
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    have_slurm || die "apt-get install did not provide srun/slurmctld/slurmd/munged"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # already running
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- munged --force
    touch "$DIR/munged.ours"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munged did not start"
}

write_conf() {
    local host node_line
    host=$(hostname -s)
    # The node line as slurmd sees this machine (CPUs, sockets, cores, threads), memory kept small
    # so that it never exceeds what is free.
    node_line=$(slurmd -C | head -1 | sed -e 's/ RealMemory=[0-9]*//' -e "s/^NodeName=[^ ]*/NodeName=$host/")
    # jax.distributed finds the coordinator by the node's name: make sure the name resolves.
    if ! getent hosts "$host" >/dev/null; then
        log "adding '127.0.0.1 $host' to /etc/hosts"
        echo "127.0.0.1 $host" >>/etc/hosts
    fi
    mkdir -p "$DIR/ctld" "$DIR/d"
    cat >"$CONF" <<EOF
# Written by launch/slurm/local_cluster.sh: a one-node cluster, no cgroups, no accounting.
ClusterName=llamajax
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${LLAMA_JAX_SLURMCTLD_PORT:-6817}
SlurmdPort=${LLAMA_JAX_SLURMD_PORT:-6818}
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=60
$node_line RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    if [ ! -e "$ETC_CONF" ]; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -s "$CONF" "$ETC_CONF"
    fi
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -o %T 2>/dev/null | head -1; }

up() {
    install
    [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
    mkdir -p "$DIR"
    if pid_alive "$DIR/slurmctld.pid" && [ "$(node_state)" = idle ]; then
        log "already up"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    down_daemons
    start_munge
    write_conf
    slurmctld -f "$CONF" -c -i
    slurmd -f "$CONF"
    local state=""
    for _ in $(seq $((TIMEOUT * 2))); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated) break ;;
            down* | drain* | inval*) SLURM_CONF=$CONF scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        log "node state '$state' after ${TIMEOUT}s; logs:"
        tail -n 30 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
        die "the cluster did not come up"
    fi
    log "up: $(SLURM_CONF=$CONF sinfo -h -N -o '%N %T %c CPUs') (config $CONF)"
    echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM, wait up to 10 s, then SIGKILL
    local f=$1 pid
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

down_daemons() {
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
}

down() {
    down_daemons
    if [ -f "$DIR/munged.ours" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$DIR/munged.ours"
    fi
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
    log "down"
}

status() {
    pid_alive "$DIR/slurmctld.pid" || { echo "down"; return 1; }
    SLURM_CONF=$CONF sinfo -N
}

case ${1:-} in
    install) install ;;
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
