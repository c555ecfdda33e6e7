#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests: `scripts/slurm-local.sh up|down`.
#   up:   installs slurmctld, slurmd, slurmdbd, slurm-client, munge and mariadb-server from Debian
#         if missing (root), writes a one-node slurm.conf under $STATE (this host, its CPUs and
#         memory, one partition), starts munged (unless running), a private MariaDB (its data in
#         $STATE, 127.0.0.1:$DB_PORT) and slurmdbd for job accounting (what `sacct`, and so
#         submitit, reads), slurmctld and slurmd, and waits until the node is idle.
#   down: stops exactly the daemons `up` started (by their pid files under $STATE).
# Nothing outside $STATE changes except the Debian packages and munge's key (created if absent).
set -euo pipefail
STATE=${SLURM_LOCAL_DIR:-/tmp/mnistlab-slurm}
CONF=$STATE/slurm.conf
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
PACKAGES="slurmctld slurmd slurmdbd slurm-client munge mariadb-server"

up() {
    local missing=0 daemon
    for daemon in slurmctld slurmd slurmdbd sinfo munged mariadbd; do
        command -v "$daemon" >/dev/null || missing=1
    done
    if [ "$missing" = 1 ]; then
        [ "$(id -u)" = 0 ] || { echo "error: SLURM is missing and installing it needs root; run: sudo $0 up" >&2; exit 1; }
        apt-get update -q
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $PACKAGES
    fi
    mkdir -p "$STATE"/{spool,state,log,run}
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, less 1 GB for the system
    cat > "$CONF" <<CONF
ClusterName=mnistlab
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if ! munge -n >/dev/null 2>&1; then  # munged runs as its own user: its pid file in a folder it owns
        mkdir -p "$STATE/munge" && chown munge:munge "$STATE/munge"
        runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid"
    fi
    if [ ! -d "$STATE/mysql" ]; then
        mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=normal >"$STATE/log/mysql-install.log" 2>&1
    fi
    mariadbd --user=root --datadir="$STATE/mysql" --socket="$STATE/run/mysql.sock" --bind-address=127.0.0.1 \
        --port="$DB_PORT" --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mysql.log" >>"$STATE/log/mysql.log" 2>&1 &
    for _ in $(seq 30); do [ -S "$STATE/run/mysql.sock" ] && break; sleep 1; done
    mariadb --socket="$STATE/run/mysql.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    cat > "$STATE/slurmdbd.conf" <<DBD
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
DBD
    chmod 600 "$STATE/slurmdbd.conf"
    SLURM_CONF=$CONF slurmdbd
    for _ in $(seq 30); do SLURM_CONF=$CONF sacctmgr -i -n list cluster >/dev/null 2>&1 && break; sleep 1; done
    SLURM_CONF=$CONF sacctmgr -i add cluster mnistlab >/dev/null 2>&1 || true
    SLURM_CONF=$CONF slurmctld
    SLURM_CONF=$CONF slurmd
    for _ in $(seq 60); do
        if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "SLURM is up: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 1
    done
    echo "error: the node did not become idle in 60 s; see $STATE/log/" >&2
    exit 1
}

down() {
    for pidfile in "$STATE"/run/{slurmd,slurmctld,slurmdbd,mariadbd}.pid "$STATE/munge/munged.pid"; do
        if [ -s "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    echo "SLURM daemons stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
