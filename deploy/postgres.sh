#!/usr/bin/env bash
# A private PostgreSQL server from Debian's `postgresql` package, for the tests and the cluster
# test: installed when missing, initialised once in its own data directory, started when not
# already answering. Prints its URL (a superuser `mm`, trust authentication) on stdout;
# everything else goes to stderr.
#
#   deploy/postgres.sh          start (or find running) and print the URL
#   deploy/postgres.sh stop     stop it
#
# Settings (environment; not MM_*, which the orchestrator reads as its configuration):
#   PG_PORT    port (54329)
#   PG_DIR     data directory (/var/tmp/mm-postgres-$PG_PORT; not under /root, which the
#              postgres user cannot enter)
#   PG_LISTEN  addresses to listen on (127.0.0.1); the cluster test adds its Docker network's
#   PG_HBA     gateway, and a CIDR whose clients may connect besides loopback (e.g. the Docker
#              network's subnet)
# The server is for tests: fsync is off, authentication is trust. Never point it at data.
set -euo pipefail
PG_PORT="${PG_PORT:-54329}"
PG_DIR="${PG_DIR:-/var/tmp/mm-postgres-$PG_PORT}"
PG_LISTEN="${PG_LISTEN:-127.0.0.1}"
PG_HBA="${PG_HBA:-}"

sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$bin" ]]; then
    echo "postgres.sh: installing Debian's postgresql" >&2
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql >&2
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
fi

# PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user.
as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ "${1:-start}" == "stop" ]]; then
    [[ -f "$PG_DIR/postmaster.pid" ]] && as_pg "$bin/pg_ctl" -D "$PG_DIR" -m fast -w stop >&2
    exit 0
fi

url="postgres://mm@127.0.0.1:$PG_PORT/postgres"
if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    echo "$url"
    exit 0
fi
if [[ ! -f "$PG_DIR/PG_VERSION" ]]; then
    mkdir -p "$PG_DIR"
    [[ $(id -u) == 0 ]] && chown postgres: "$PG_DIR"
    as_pg "$bin/initdb" -D "$PG_DIR" -U mm --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
fi
if [[ -n "$PG_HBA" ]] && ! grep -qF "$PG_HBA" "$PG_DIR/pg_hba.conf"; then
    echo "host all all $PG_HBA trust" | as_pg tee -a "$PG_DIR/pg_hba.conf" >/dev/null
fi
as_pg "$bin/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -t 60 start \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses='$PG_LISTEN' -c fsync=off -c max_connections=200" >&2 \
    || { tail -n 20 "$PG_DIR/server.log" >&2; exit 1; }
echo "$url"
