#!/usr/bin/env bash
# Install and start a single-node Slurm (munged, slurmctld, slurmd) for tests/managers/.
#
# Debian 12 (Slurm 22.05), as root, no systemd needed: the daemons are started directly.
# Idempotent: packages already installed are kept, a daemon already running is left alone
# (restarted only when this script's slurm.conf differs from the one it runs with), and the
# script ends by checking that `srun -n2 hostname` works. Run it by hand on a developer
# machine the same way CI does: `sudo .ci/setup-slurm.sh`.
#
# Settings that work on a VM without cgroups and without systemd:
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no cgroup.conf, and a node line
#   whose Sockets/CoresPerSocket/ThreadsPerCore match the machine (slurmd drains a node that
#   claims more than it has).
set -euo pipefail

DEADLINE_SECONDS="${SLURM_SETUP_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="Written by distexec's .ci/setup-slurm.sh"
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

log() { echo "setup-slurm: $*"; }
die() { echo "setup-slurm: ERROR: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "must run as root"
fi

# --------------------------------------------------------------------------- packages
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v srun >/dev/null && command -v munged >/dev/null; then
        log "packages already installed"
        return
    fi
    # Keep the packages' maintainer scripts from starting daemons (there may be no init
    # system); this script starts them itself. Leave an existing policy in place.
    local own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    # Another setup script may be running apt at the same time: wait for its lock.
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -qq)
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        "${apt[@]}" update
    fi
    local status=0
    "${apt[@]}" install -y --no-install-recommends slurm-wlm munge >/dev/null || status=$?
    if [ -n "$own_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    [ "$status" -eq 0 ] || die "apt-get install slurm-wlm munge failed ($status)"
    log "installed $(dpkg-query -W -f '${Package} ${Version}' slurmctld)"
}

# --------------------------------------------------------------------------- munge
start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running"
        return
    fi
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    wait_for "munged answers" sh -c 'munge -n </dev/null | unmunge >/dev/null 2>&1'
}

# --------------------------------------------------------------------------- slurm.conf
lscpu_field() {  # the value of one "Name: value" line of lscpu, or $2 when absent or "-"
    local value
    value="$(lscpu | sed -n "s/^$1:[[:space:]]*//p" | head -n1)"
    case "$value" in
        ''|-|*[!0-9]*) echo "$2" ;;
        *) echo "$value" ;;
    esac
}

write_conf() {  # prints "changed" when the file was (re)written
    local host cpus sockets cores threads mem_mb real_mem slurm_user
    host="$(hostname -s)"
    cpus="$(nproc --all)"
    sockets="$(lscpu_field 'Socket(s)' 1)"
    threads="$(lscpu_field 'Thread(s) per core' 1)"
    cores="$(lscpu_field 'Core(s) per socket' $(( cpus / sockets / threads )))"
    if [ $(( sockets * cores * threads )) -ne "$cpus" ]; then
        # lscpu disagrees with itself (some VMs): describe the CPUs slurmd will count.
        sockets=1 cores="$cpus" threads=1
    fi
    mem_mb=$(( $(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024 ))
    real_mem=$(( mem_mb * 9 / 10 ))  # a bit under: slurmd drains a node claiming more
    slurm_user=root
    if id slurm >/dev/null 2>&1; then slurm_user=slurm; fi

    install -d -m 0755 "$CONF_DIR" /var/log/slurm /var/spool/slurmd
    install -d -o "$slurm_user" -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld
    chown "$slurm_user" /var/log/slurm

    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script: leaving this Slurm alone"
    fi
    local new
    new="$(mktemp)"
    cat > "$new" <<EOF
# $MARKER: a single-node cluster for tests/managers/.
# The node and slurmctld are reached on 127.0.0.1, whatever the host name resolves to.
ClusterName=distexec
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$slurm_user
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
MinJobAge=30
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then
        rm -f "$new"
        return
    fi
    install -m 0644 "$new" "$CONF"
    rm -f "$new"
    echo changed
}

# --------------------------------------------------------------------------- daemons
daemon_running() {  # is the process recorded in pidfile $1 alive and named $2?
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$2" ]
}

stop_daemon() {  # stop the daemon recorded in pidfile $1 (named $2), by its pid only
    local pid
    if daemon_running "$1" "$2"; then
        pid="$(cat "$1")"
        kill "$pid"
        wait_for "$2 to stop" sh -c "! kill -0 $pid 2>/dev/null"
    fi
}

start_slurm() {
    local changed="$1"
    if [ -n "$changed" ]; then
        log "slurm.conf changed: (re)starting slurmctld and slurmd"
        stop_daemon /run/slurmd.pid slurmd
        stop_daemon /run/slurmctld.pid slurmctld
    fi
    if daemon_running /run/slurmctld.pid slurmctld; then
        log "slurmctld already running"
    else
        /usr/sbin/slurmctld
    fi
    if daemon_running /run/slurmd.pid slurmd; then
        log "slurmd already running"
    else
        /usr/sbin/slurmd
    fi
}

# --------------------------------------------------------------------------- checks
START=$SECONDS
wait_for() {  # wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds or the deadline
    local what="$1"
    shift
    until "$@"; do
        if [ $(( SECONDS - START )) -ge "$DEADLINE_SECONDS" ]; then
            show_logs
            die "timed out after ${DEADLINE_SECONDS}s waiting for $what"
        fi
        sleep 0.5
    done
}

show_logs() {
    for file in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do
        if [ -f "$file" ]; then
            echo "--- last lines of $file" >&2
            tail -n 20 "$file" >&2
        fi
    done
}

node_idle() {
    local state
    state="$(sinfo -h -N -n "$(hostname -s)" -o %t 2>/dev/null || true)"
    case "$state" in
        idle|mix|alloc) return 0 ;;
        drain*|down*|fail*)  # a node left down by an earlier run: ReturnToService covers most
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;
    esac
}

srun_works() {
    [ "$(timeout 20 srun -n2 --quit-on-interrupt hostname 2>/dev/null | wc -l)" -eq 2 ]
}

main() {
    install_packages
    start_munge
    local changed
    changed="$(write_conf)"
    start_slurm "$changed"
    wait_for "slurmctld to answer" sh -c 'scontrol ping 2>/dev/null | grep -q UP'
    wait_for "node $(hostname -s) to be idle" node_idle
    wait_for "srun -n2 hostname to work" srun_works
    log "ready in $(( SECONDS - START ))s: $(sinfo -h -o '%P %D %c %t %N' | head -n1)"
}

main "$@"
