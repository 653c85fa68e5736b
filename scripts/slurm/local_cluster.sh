#!/usr/bin/env bash
# A real one-node Slurm cluster on 127.0.0.1, for tests and for trying the Slurm launcher by hand.
#
#   local_cluster.sh install    apt-get the daemons (slurmctld, slurmd, slurm-client, munge)
#   local_cluster.sh start DIR  write the config under DIR, start munged, slurmctld and slurmd,
#                               wait until `srun hostname` and a batch job have run; prints DIR/env
#   local_cluster.sh stop DIR   cancel the jobs, stop the daemons started by `start DIR`
#                               (by their recorded pids); does nothing if none runs
#
# Use it with `. DIR/env` (exports SLURM_CONF, and PATH with the `sacct` stand-in first).
# Everything but the packages lives under DIR: config, munge key and socket, spool, logs, pids.
# No accounting: `sacct` is answered from `squeue -t all` by scripts/slurm/sacct.
set -euo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly NODE=localnode
readonly PARTITION=debug
readonly READY_TIMEOUT_S=${SLURM_LOCAL_READY_TIMEOUT_S:-60}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE

die() {
    echo "local_cluster: $*" >&2
    exit 1
}

installed() {
    local exe
    for exe in munged slurmctld slurmd srun sbatch sinfo squeue scancel; do
        command -v "$exe" >/dev/null 2>&1 || return 1
    done
}

cmd_install() {
    if installed; then
        echo "local_cluster: already installed"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install needs root (apt-get); run it as root or install ${PACKAGES[*]} yourself"
    # one install at a time (parallel test workers): the later ones find the packages installed
    exec 9>/run/lock/ppl-gmm-slurm-install.lock
    flock 9
    if installed; then
        return 0
    fi
    # Debian's maintainer scripts start the daemons unless policy-rc.d says no (101 = action forbidden).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    # wait for an unrelated apt-get rather than fail on its lock
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300)
    if ! "${apt[@]}" install --no-install-recommends "${PACKAGES[@]}"; then
        "${apt[@]}" update
        "${apt[@]}" install --no-install-recommends "${PACKAGES[@]}"
    fi
    if ((made_policy)); then
        rm -f "$policy"
        trap - EXIT
    fi
    installed || die "installed ${PACKAGES[*]} but the daemons are still not on PATH"
}

pick_ports() {
    # sets PORTS to $1 distinct ports below Linux's ephemeral range (32768-60999) that no socket uses
    local port tries
    PORTS=()
    for ((tries = 0; tries < 500 && ${#PORTS[@]} < $1; tries++)); do
        port=$((20000 + RANDOM % 12000))
        [[ " ${PORTS[*]} " == *" $port "* ]] && continue
        [[ -z $(ss -Htan "( sport = :$port )") ]] && PORTS+=("$port")
    done
    ((${#PORTS[@]} == $1)) || die "found no $1 free TCP ports in 20000-31999"
}

log_tails() {
    local dir=$1 log
    for log in "$dir"/log/*.log; do
        [[ -e $log ]] || continue
        echo "---- tail of $log" >&2
        tail -n 25 "$log" >&2
    done
}

pid_alive() {
    # the pid runs and still runs the executable recorded for it (pids get reused)
    local pid=$1 exe=$2
    [[ -e /proc/$pid ]] && [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]]
}

running_daemons() {
    local dir=$1 name pid exe
    [[ -e $dir/run/pids ]] || return 0
    while read -r name pid exe; do
        if pid_alive "$pid" "$exe"; then echo "$name $pid"; fi
    done <"$dir/run/pids"
}

start_daemon() {
    # start NAME (a daemon that forks and writes PIDFILE), wait for its pid, record it with its executable
    local dir=$1 name=$2 pidfile=$3 i pid
    shift 3
    "$@" || { log_tails "$dir"; die "$name did not start: $*"; }
    for ((i = 0; i < 100; i++)); do
        [[ -s $pidfile ]] && break
        sleep 0.1
    done
    pid=$(tr -d '[:space:]' <"$pidfile" 2>/dev/null) || true
    if [[ -z $pid ]] || [[ ! -e /proc/$pid ]]; then
        log_tails "$dir"
        die "$name did not come up (no live pid in $pidfile after 10 s)"
    fi
    echo "$name $pid $(readlink "/proc/$pid/exe")" >>"$dir/run/pids"
}

write_config() {
    local dir=$1 topology
    pick_ports 2
    # the node's real topology (plain CPUs=N is rejected when it disagrees with the sockets/cores)
    topology=$(slurmd -C | head -n 1 | tr ' ' '\n' |
        grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    [[ $topology == *CPUs=* ]] || die "could not read the node topology from 'slurmd -C': $(slurmd -C 2>&1 | head -n 3)"
    cat >"$dir/etc/slurm.conf" <<EOF
# a one-node cluster on 127.0.0.1, written by scripts/slurm/local_cluster.sh
ClusterName=local
# a name with its address in parentheses: no hostname lookup (slurmctld wants its own short name)
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=${PORTS[0]}
SlurmdPort=${PORTS[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/etc/plugstack.conf
MailProg=/bin/true
# no cgroups in a container: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# schedule at once: the default batching makes a 4-task array take 4 s instead of 1.6 s
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# keep finished jobs an hour: the sacct stand-in reads their final state from squeue
MinJobAge=3600
# a cancelled job's processes get SIGKILL 3 s after SIGTERM (submitit's jobs ignore SIGTERM)
KillWait=3
ReturnToService=2
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 $topology State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$dir/etc/plugstack.conf"
}

cmd_start() {
    local dir deadline out cpus
    installed || die "Slurm is not installed; run '$0 install' first"
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    if [[ -n $(running_daemons "$dir") ]]; then
        die "daemons of $dir still run ($(running_daemons "$dir" | tr '\n' ' ')); run '$0 stop $dir' first"
    fi
    rm -rf "$dir/run" "$dir/log" "$dir/spool" "$dir/state" "$dir/munge"
    mkdir -p "$dir/etc" "$dir/bin" "$dir/run" "$dir/log" "$dir/spool" "$dir/state"
    # munged wants its socket directory searchable by all, and its key private
    mkdir -m 755 "$dir/munge"
    (umask 077 && head -c 1024 /dev/urandom >"$dir/munge/munge.key")
    write_config "$dir"
    install -m 755 "$HERE/sacct" "$dir/bin/sacct"
    cat >"$dir/env" <<EOF
# '. $dir/env' to use the cluster (its sacct stand-in comes before any real sacct)
export SLURM_CONF='$dir/etc/slurm.conf'
export PATH='$dir/bin':"\$PATH"
EOF
    cpus=$(grep -o ' CPUs=[0-9]*' "$dir/etc/slurm.conf" | cut -d= -f2)
    printf 'slurm_conf=%s\nbin=%s\npartition=%s\ncpus=%s\n' \
        "$dir/etc/slurm.conf" "$dir/bin" "$PARTITION" "$cpus" >"$dir/info"
    export SLURM_CONF=$dir/etc/slurm.conf
    : >"$dir/run/pids"
    # a failed start stops whatever it started (DIR expanded now, on purpose)
    # shellcheck disable=SC2064
    trap "cmd_stop $(printf %q "$dir") || true" EXIT

    # --force: pytest's tmp dirs (0700) make the socket unreachable to other users; all clients
    # here run as root
    start_daemon "$dir" munged "$dir/munge/munged.pid" \
        munged --force --origin=127.0.0.1 --socket="$dir/munge/munge.socket" \
        --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --seed-file="$dir/munge/munged.seed" --log-file="$dir/log/munged.log"
    # -c: a clean start, no job carried over from an earlier start in the same directory
    start_daemon "$dir" slurmctld "$dir/run/slurmctld.pid" slurmctld -c -i
    start_daemon "$dir" slurmd "$dir/run/slurmd.pid" slurmd -N "$NODE"

    deadline=$((SECONDS + READY_TIMEOUT_S))
    until out=$(timeout 20 srun --partition="$PARTITION" --ntasks=1 --time=1 hostname 2>&1); do
        if [[ $(running_daemons "$dir" | wc -l) -ne 3 ]]; then
            log_tails "$dir"
            die "a daemon exited (still running: $(running_daemons "$dir" | tr '\n' ' '))"
        fi
        if ((SECONDS >= deadline)); then
            echo "the last srun said: $out" >&2
            sinfo >&2 || true
            log_tails "$dir"
            die "the cluster in $dir did not run 'srun hostname' within ${READY_TIMEOUT_S} s"
        fi
        sleep 0.2
    done
    # the scheduler starts batch jobs only from its first cycle, ~3 s after slurmctld starts:
    # wait for one here, so that later batch jobs start at once
    local job state
    job=$(sbatch --parsable --partition="$PARTITION" --time=1 --output=/dev/null --wrap=true) ||
        die "sbatch failed on the cluster in $dir"
    until state=$(squeue --noheader --states=all --jobs="$job" --format=%T) && [[ $state == COMPLETED ]]; do
        if ((SECONDS >= deadline)); then
            log_tails "$dir"
            die "a batch job on the cluster in $dir did not complete within ${READY_TIMEOUT_S} s (state: $state)"
        fi
        sleep 0.1
    done
    trap - EXIT
    echo "$dir/env"
}

stop_pid() {
    # SIGTERM, then SIGKILL after 10 s; only while the pid still runs the recorded executable
    local name=$1 pid=$2 exe=$3 i
    pid_alive "$pid" "$exe" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" "$exe" || return 0
        sleep 0.1
    done
    echo "local_cluster: $name (pid $pid) outlived SIGTERM by 10 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

step_daemons() {
    # pids of the slurmstepd processes of the cluster in $1 (they hold its slurmd log open)
    local dir=$1 stepd proc fd
    stepd=$(readlink -f "$(command -v slurmstepd)")
    for proc in /proc/[0-9]*; do
        [[ $(readlink "$proc/exe" 2>/dev/null) == "$stepd" ]] || continue
        for fd in "$proc"/fd/*; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$dir/log/slurmd.log" ]]; then
                echo "${proc#/proc/}"
                break
            fi
        done
    done
}

kill_tree() {
    # SIGKILL a process and all its descendants, parents first so that none respawns
    local pid=$1 child
    kill -KILL "$pid" 2>/dev/null || true
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        kill_tree "$child"
    done
}

cmd_stop() {
    local dir=$1 name n pid exe i ids left
    [[ -e $dir/run/pids ]] || return 0
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/etc/slurm.conf
    if [[ $'\n'$(running_daemons "$dir") == *$'\n'"slurmctld "* ]]; then
        # cancel every job, then give slurmd KillWait (3 s) and more to end the job steps: a step
        # left running when slurmd stops never gets its SIGKILL
        mapfile -t ids < <(timeout 10 squeue --noheader --format=%A --states=PENDING,RUNNING,SUSPENDED 2>/dev/null)
        ((${#ids[@]} == 0)) || timeout 10 scancel --quiet "${ids[@]}" >/dev/null 2>&1 || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(step_daemons "$dir") ]] && break
            sleep 0.1
        done
    fi
    # the reverse of the start order
    for name in slurmd slurmctld munged; do
        while read -r n pid exe; do
            if [[ $n == "$name" ]]; then stop_pid "$name" "$pid" "$exe"; fi
        done <"$dir/run/pids"
    done
    left=$(step_daemons "$dir")
    if [[ -n $left ]]; then
        echo "local_cluster: job steps outlived the cluster; killing them and their processes: $left" >&2
        for pid in $left; do kill_tree "$pid"; done
    fi
}

usage() {
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
}

case ${1:-} in
install) [[ $# -eq 1 ]] || usage; cmd_install ;;
start) [[ $# -eq 2 ]] || usage; cmd_start "$2" ;;
stop) [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
*) usage ;;
esac
