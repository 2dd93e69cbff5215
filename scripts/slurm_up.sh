#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (Debian 12, run as root, no systemd).
#
#   sudo scripts/slurm_up.sh
#
# Idempotent: installs Debian's slurmctld/slurmd/slurm-client/munge only when missing,
# creates a munge key only when absent, rewrites /etc/slurm/slurm.conf only when its
# content changes, and (re)starts munged/slurmctld/slurmd only when they are not running
# or run with an older config. Ends with one line:
#   slurm up: node <host>, <N> cpus, partition debug
# See scripts/README-slurm.md for the settings and why.
#
# Environment overrides (all optional):
#   SLURM_UP_WAIT          seconds to wait for the node to become usable (default 60)
#   SLURM_UP_MIN_JOB_AGE   seconds a finished job stays visible to squeue/scontrol (default 10)
#   SLURM_UP_MEM_MARGIN_MB memory kept back from Slurm (default: max(512, 5% of MemTotal))
set -euo pipefail

PARTITION=debug
WAIT_S=${SLURM_UP_WAIT:-60}
MIN_JOB_AGE=${SLURM_UP_MIN_JOB_AGE:-10}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
STAMP=$RUN_DIR/slurm_up.stamp   # "<slurm.conf hash> <slurmctld pid> <slurmd pid>" at last start
MUNGE_KEY=/etc/munge/munge.key

log() { echo "slurm_up: $*" >&2; }
die() { echo "slurm_up: ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------- 1. packages
need_install=0
for cmd in sbatch squeue sinfo scontrol slurmctld slurmd munged munge unmunge; do
    command -v "$cmd" >/dev/null 2>&1 || { need_install=1; break; }
done
if (( need_install )); then
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # Package scripts may try to start services; with no systemd (and a policy-rc.d that
    # returns 101 in containers) that is skipped, which is what we want: we start them below.
    apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
    hash -r
    for cmd in sbatch slurmctld slurmd munged; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after apt-get install"
    done
fi

# ---------------------------------------------------------------- helpers
# pid of a running daemon: from its pid file if that process is alive and has the right
# name, else the oldest process with exactly that name (pgrep -x, for daemons started by
# hand or by an older version of this script). Prints nothing if not running.
daemon_pid() {
    local name=$1 pidfile=$2 pid
    if [[ -s $pidfile ]]; then
        pid=$(<"$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && [[ $(ps -o comm= -p "$pid" 2>/dev/null) == "$name" ]]; then
            echo "$pid"; return 0
        fi
    fi
    pgrep -o -x "$name" 2>/dev/null || true
}

# stop a daemon by its pid; SIGTERM, then SIGKILL after 10 s
stop_daemon() {
    local name=$1 pidfile=$2 pid i
    pid=$(daemon_pid "$name" "$pidfile")
    [[ -n $pid ]] || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

tail_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# ---------------------------------------------------------------- 2. munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

if [[ ! -s $MUNGE_KEY ]]; then
    log "creating munge key $MUNGE_KEY"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" --force
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

if ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # A munged that runs but does not answer (e.g. started before the key changed) is
    # stopped; a stale socket/pid from a dead one makes the new one refuse to start.
    stop_daemon munged /run/munge/munged.pid
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for ((i = 0; i < 100; i++)); do
        munge_ok && break
        sleep 0.1
    done
    munge_ok || { tail_logs; die "munged did not come up (munge -n | unmunge fails)"; }
fi

# ---------------------------------------------------------------- 3. slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)
mem_total_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
# in a container with a memory limit, promise no more than the limit
for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
    lim=$(cat "$f" 2>/dev/null || true)
    if [[ $lim =~ ^[0-9]+$ ]] && (( lim / 1048576 < mem_total_mb )); then
        mem_total_mb=$(( lim / 1048576 ))
    fi
done
margin_mb=${SLURM_UP_MEM_MARGIN_MB:-$(( mem_total_mb / 20 > 512 ? mem_total_mb / 20 : 512 ))}
REAL_MEM=$(( mem_total_mb - margin_mb ))
(( REAL_MEM >= 256 )) || die "too little memory: MemTotal ${mem_total_mb} MB, margin ${margin_mb} MB"
DEF_MEM_PER_CPU=$(( REAL_MEM / CPUS ))

if ! getent hosts "$HOST" >/dev/null 2>&1; then
    log "warning: host name '$HOST' does not resolve; slurm talks over 127.0.0.1, but" \
        "tools that use SLURM_JOB_NODELIST as an address (e.g. torch MASTER_ADDR) will fail"
fi

id slurm >/dev/null 2>&1 || die "user 'slurm' is missing (it comes with the slurm packages)"
install -d -m 0755 "$CONF_DIR"
install -d -o slurm -g slurm -m 0755 "$LOG_DIR" "$RUN_DIR" "$CTLD_SPOOL"
install -d -o root -g root -m 0755 "$SLURMD_SPOOL"

new_conf=$(cat <<EOF
# Written by scripts/slurm_up.sh: a one-node cluster for tests and development.
# Rewritten on every run of the script; edit the script, not this file.
ClusterName=localci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it can start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
# no mail on this machine; the default (/bin/mail) is absent and slurmctld logs an error
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# run the scheduler every 2 s (defaults: main 60 s, backfill 30 s). A requeued job becomes
# eligible cred_expire seconds later, but nothing wakes the scheduler then: with the
# defaults it sat PENDING (BeginTime) for up to ~40 s more, with these it starts at once
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that gives no --mem is allocated the whole node's memory and
# runs alone; with this, N one-cpu jobs run side by side
DefMemPerCPU=${DEF_MEM_PER_CPU}
ReturnToService=2
JobRequeue=1
# seconds between SIGTERM and SIGKILL for a cancelled/requeued step (default 30);
# submitit's job ignores SIGTERM, so this is how long it runs on
KillWait=2
# seconds a finished job stays visible to squeue/scontrol (default 300); there is no sacct
MinJobAge=${MIN_JOB_AGE}
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=${CTLD_SPOOL}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REAL_MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
)

if [[ ! -f $CONF ]] || [[ $(<"$CONF") != "$new_conf" ]]; then
    log "writing $CONF"
    printf '%s\n' "$new_conf" > "$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
fi
conf_hash=$(sha256sum "$CONF" | cut -d' ' -f1)

# ---------------------------------------------------------------- 4. daemons
# The stamp holds "<hash of slurm.conf> <slurmctld pid> <slurmd pid>" as of the last start
# by this script. Daemons that run with another config, that were restarted by someone
# else, or only one of which runs, are all stopped and started again (running jobs survive
# this: their slurmstepd processes carry on and slurmctld recovers its state).
ctld_pid=$(daemon_pid slurmctld "$CTLD_PID")
slurmd_pid=$(daemon_pid slurmd "$SLURMD_PID")
stamp=$(cat "$STAMP" 2>/dev/null || true)

# waits for a freshly started daemon's pid file, prints the pid
wait_pidfile() {
    local name=$1 pidfile=$2 pid i
    for ((i = 0; i < 100; i++)); do
        if [[ -s $pidfile ]]; then
            pid=$(<"$pidfile")
            if [[ $pid =~ ^[0-9]+$ ]] && [[ $(ps -o comm= -p "$pid" 2>/dev/null) == "$name" ]]; then
                echo "$pid"; return 0
            fi
        fi
        sleep 0.1
    done
    tail_logs
    die "$name started but wrote no pid file $pidfile within 10 s"
}

# both alive and answering (a daemon that is shutting down still has a pid for a few s)
daemons_answer() {
    scontrol ping 2>/dev/null | grep -q 'is UP' && scontrol show slurmd >/dev/null 2>&1
}

if [[ -n $ctld_pid && -n $slurmd_pid && $stamp == "$conf_hash $ctld_pid $slurmd_pid" ]] \
        && daemons_answer; then
    started=0
else
    if [[ -n $ctld_pid || -n $slurmd_pid ]]; then
        if [[ -z $ctld_pid || -z $slurmd_pid ]]; then
            log "only one of slurmctld/slurmd is running: restarting both"
        elif [[ ${stamp%% *} != "$conf_hash" ]]; then
            log "daemons run with another or unknown config: restarting them"
        else
            log "daemons were restarted by hand or do not answer: restarting them"
        fi
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    rm -f "$STAMP"
    log "starting slurmctld"
    slurmctld || { tail_logs; die "slurmctld failed to start"; }
    ctld_pid=$(wait_pidfile slurmctld "$CTLD_PID")
    log "starting slurmd"
    slurmd || { tail_logs; die "slurmd failed to start"; }
    slurmd_pid=$(wait_pidfile slurmd "$SLURMD_PID")
    echo "$conf_hash $ctld_pid $slurmd_pid" > "$STAMP"
    started=1
fi

# Wait until the node is usable. A fresh start reports idle; a cluster already running
# jobs (second run of this script) reports mixed/allocated, which is fine too.
state=""
resumed=0
deadline=$(( SECONDS + WAIT_S ))
while :; do
    state=$(sinfo -h -N -n "$HOST" -p "$PARTITION" -o %T 2>/dev/null | head -n1 || true)
    case $state in
        idle|mixed|allocated|completing) break ;;
        inval|inval\*)
            # the node has less than slurm.conf says (memory, cpus): waiting will not help
            deadline=$SECONDS ;;
        drained|draining|down|down\*|fail|failing)
            # ReturnToService=2 brings a DOWN node back when slurmd registers, but not a
            # drained one (e.g. left over from an earlier config): resume it once.
            if (( ! resumed )); then
                log "node $HOST is $state ($(sinfo -h -N -n "$HOST" -o %E 2>/dev/null)); resuming it"
                scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    if (( SECONDS >= deadline )); then
        reason=$(sinfo -h -N -n "$HOST" -o %E 2>/dev/null | head -n1 || true)
        echo "slurm_up: ERROR: node $HOST not usable (state: '${state:-no answer from slurmctld}'," \
             "reason: '${reason:-none}'; waited up to ${WAIT_S}s)" >&2
        sinfo -N -l >&2 2>&1 || true
        tail_logs
        exit 1
    fi
    sleep 0.5
done

(( started )) || log "daemons already running with this config"
echo "slurm up: node ${HOST}, ${CPUS} cpus, partition ${PARTITION}"
