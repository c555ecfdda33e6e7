#!/usr/bin/env bash
# A throwaway PostgreSQL server on this machine, for the tests of an Optuna study shared by many
# machines: `scripts/postgres-local.sh up|down`.
#   up:   installs Debian's `postgresql` if missing (root), makes a cluster under $STATE (owned by
#         the `postgres` user when run as root: PostgreSQL refuses to run as root), starts it on
#         127.0.0.1:$PORT only, trusting local connections, and creates the database `mnistlab`.
#         Prints the URL to pass as storage=.
#   down: stops that server and removes $STATE.
# Nothing outside $STATE changes except the Debian package.
set -euo pipefail
STATE=${POSTGRES_LOCAL_DIR:-/tmp/mnistlab-postgres}
PORT=${POSTGRES_LOCAL_PORT:-55432}

bin() {  # a PostgreSQL server program: on PATH, or in Debian's versioned folder
    command -v "$1" 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1
}

as_owner() {  # run as the cluster's owner: `postgres` when this script runs as root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

up() {
    if [ -z "$(bin initdb)" ]; then
        [ "$(id -u)" = 0 ] || { echo "error: PostgreSQL is missing and installing it needs root; run: sudo $0 up" >&2; exit 1; }
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
    fi
    mkdir -p "$STATE"
    [ "$(id -u)" = 0 ] && chown postgres: "$STATE"
    if [ ! -f "$STATE/data/PG_VERSION" ]; then
        as_owner "$(bin initdb)" -D "$STATE/data" -U postgres --auth=trust -E UTF8 >"$STATE/initdb.log"
    fi
    as_owner "$(bin pg_ctl)" -D "$STATE/data" -l "$STATE/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$STATE" start >/dev/null
    as_owner "$(bin psql)" -h 127.0.0.1 -p "$PORT" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='mnistlab'" | grep -q 1 \
        || as_owner "$(bin createdb)" -h 127.0.0.1 -p "$PORT" -U postgres mnistlab
    echo "postgresql://postgres@127.0.0.1:$PORT/mnistlab"
}

down() {
    if [ -f "$STATE/data/postmaster.pid" ]; then
        as_owner "$(bin pg_ctl)" -D "$STATE/data" -m fast -w stop >/dev/null
    fi
    rm -rf "$STATE"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
