#!/usr/bin/env bash
# Builds the image `muse-majordomo:local` from nothing, without a registry or a second Rust
# build: the host-built release binaries muse, majordomo and mm, exactly the shared libraries
# `ldd` names for them (the dynamic loader included), a passwd/group naming the unprivileged
# user and an nsswitch.conf (glibc's getaddrinfo reads /etc/hosts, then Docker's or the
# cluster's DNS through the resolv.conf the runtime mounts). No CA certificates: every TLS
# client in the binaries (reqwest, hf-hub, mm's https://) carries webpki-roots. No shell, no
# Python: models come from the host's Hugging Face cache mounted read-only at /hf/hub.
#
# With --postgres it also builds `muse-majordomo-postgres:local`, PostgreSQL from this host's
# Debian package the same way, for deploy/compose.yaml: it takes the official image's
# POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB, so `postgres:15` can replace it. Stop it
# with SIGINT (fast shutdown; compose sets stop_signal).
#
#   deploy/image.sh [--postgres]    build what changed (idempotent: a second or so when
#                                   nothing did), print the image names
#
# Missing binaries are built first (cargo build --release --workspace).
set -euo pipefail
self="$(readlink -f "$0")"
cd "$(dirname "$self")/.."
IMAGE="${IMAGE:-muse-majordomo:local}"
PG_IMAGE="${PG_IMAGE:-muse-majordomo-postgres:local}"
root=target/image-root

# The libraries the ELF files $@ load, as ldd resolves them on this host. "not found" is
# fatal: the image would not start.
libs() {
    local f
    for f in "$@"; do
        if ldd "$f" | grep -q "not found"; then
            ldd "$f" >&2
            echo "image.sh: $f needs a library this host lacks" >&2
            return 1
        fi
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)"
        ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
    done | sort -u
}

# Copies host paths into $root at the same paths (-L: files, not the host's symlinks to them;
# the loader's path is written in each ELF header, so it must stay where it was).
add() {
    local p
    for p in "$@"; do
        mkdir -p "$root$(dirname "$p")"
        cp -RL "$p" "$root$p"
    done
}

# True when image $1 exists with inputs digest $2.
current() { [[ "$(docker image inspect -f '{{index .Config.Labels "mm.inputs"}}' "$1" 2>/dev/null || true)" == "$2" ]]; }

# Imports $root as image $1 (digest $2; the rest: Dockerfile-style changes). docker import
# keeps the archive's owners: everything is root's except the paths in $OWNED ("uid:path …"),
# and tar sets the owners, so this needs no chown and runs without root.
import() {
    local image="$1" digest="$2" o old excludes=()
    shift 2
    for o in ${OWNED:-}; do excludes+=(--exclude=".${o#*:}"); done
    tar -C "$root" -cf "$root.tar" --owner=0 --group=0 --numeric-owner "${excludes[@]}" .
    for o in ${OWNED:-}; do
        tar -C "$root" -rf "$root.tar" --owner="${o%%:*}" --group="${o%%:*}" --numeric-owner ".${o#*:}"
    done
    local changes=()
    for o in "$@" "LABEL mm.inputs=$digest"; do changes+=(-c "$o"); done
    old="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
    docker import "${changes[@]}" -m "deploy/image.sh" "$root.tar" "$image" >/dev/null
    rm -rf "$root" "$root.tar"
    # The replaced build, unless a container still uses it.
    [[ -z "$old" ]] || docker rmi "$old" >/dev/null 2>&1 || true
    echo "$image"
}

# --- muse-majordomo:local -----------------------------------------------------------------
bins=(target/release/muse target/release/majordomo target/release/mm)
for b in "${bins[@]}"; do
    if [[ ! -x "$b" ]]; then
        echo "image.sh: $b is missing: cargo build --release --workspace" >&2
        cargo build --release --workspace >&2
        break
    fi
done
lib_list="$(libs "${bins[@]}")"
mapfile -t lib_paths <<<"$lib_list"
# The inputs' digest, a label of the image: unchanged inputs, no rebuild.
digest="$({
    sha256sum "${bins[@]}" "$self"
    printf '%s\n' "${lib_paths[@]}"
    for l in "${lib_paths[@]}"; do sha256sum "$(readlink -f "$l")"; done
} | sha256sum | cut -c1-32)"
if current "$IMAGE" "$digest"; then
    echo "$IMAGE"
else
    rm -rf "$root" "$root.tar"
    mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/data" "$root/hf"
    cp "${bins[@]}" "$root/usr/local/bin/"
    add "${lib_paths[@]}"
    printf '%s\n' 'root:x:0:0:root:/:/nonexistent' 'mm:x:10001:10001:muse-majordomo:/data:/nonexistent' >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'mm:x:10001:' >"$root/etc/group"
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
    chmod 1777 "$root/tmp"
    # /data: the service user's, for a redb store if one is used there. HF_HUB_OFFLINE: a
    # missing model is an error naming it, not a download from inside a container (fetch on
    # the host: python3 deploy/fetch_models.py). The command picks the role: muse serve |
    # majordomo serve | mm serve.
    OWNED="10001:/data" import "$IMAGE" "$digest" \
        "ENV PATH=/usr/local/bin HF_HOME=/hf HF_HUB_OFFLINE=1" "USER 10001:10001" "WORKDIR /data" \
        "EXPOSE 50050 50051 50052 50080"
fi

[[ "${1:-}" == "--postgres" ]] || exit 0

# --- muse-majordomo-postgres:local --------------------------------------------------------
pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$pgbin" ]]; then
    echo "image.sh: PostgreSQL is not installed here: apt-get install postgresql (or use the official postgres:15 image)" >&2
    exit 1
fi
pgver="$(basename "$(dirname "$pgbin")")"
pglib="/usr/lib/postgresql/$pgver/lib"
# The server, initdb (which runs the server through popen, hence /bin/sh: dash), pg_isready
# for health checks, and the server's loadable modules but LLVM's JIT (jit is off).
elves=("$pgbin/postgres" "$pgbin/initdb" "$pgbin/pg_isready" /bin/dash)
mapfile -t modules < <(ls "$pglib"/*.so | grep -v llvmjit)
pg_lib_list="$(libs "${elves[@]}" "${modules[@]}")"
mapfile -t pg_libs <<<"$pg_lib_list"
entrypoint='#!/bin/sh
# The official image'"'"'s interface: POSTGRES_PASSWORD (required), POSTGRES_USER (postgres),
# POSTGRES_DB (the user'"'"'s name), PGDATA. The first start initialises PGDATA.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
user="${POSTGRES_USER:-postgres}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "POSTGRES_PASSWORD is not set" >&2; exit 1; }
    umask 077
    printf "%s\n" "$POSTGRES_PASSWORD" >/tmp/pw
    initdb -D "$PGDATA" -U "$user" --pwfile=/tmp/pw -A scram-sha-256 -E UTF8 --locale=C >/dev/null
    : >/tmp/pw
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    db="${POSTGRES_DB:-$user}"
    [ "$db" = postgres ] || echo "CREATE DATABASE \"$db\";" | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses="*" -c jit=off "$@"'
pg_digest="$({
    dpkg-query -W "postgresql-$pgver" 2>/dev/null || sha256sum "$pgbin/postgres"
    sha256sum "$self"
    printf '%s\n' "${pg_libs[@]}"
} | sha256sum | cut -c1-32)"
if current "$PG_IMAGE" "$pg_digest"; then
    echo "$PG_IMAGE"
    exit 0
fi
rm -rf "$root" "$root.tar"
mkdir -p "$root/etc" "$root/tmp" "$root/bin" "$root/usr/local/bin" "$root/var/lib/postgresql/data" "$root/var/run/postgresql"
add "${elves[@]}" "${modules[@]}" "${pg_libs[@]}" "/usr/share/postgresql/$pgver" /usr/share/zoneinfo
mv "$root/bin/dash" "$root/bin/sh"
printf '%s\n' "$entrypoint" >"$root/usr/local/bin/postgres-entrypoint"
chmod 755 "$root/usr/local/bin/postgres-entrypoint"
printf '%s\n' 'root:x:0:0:root:/:/nonexistent' 'postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/nonexistent' >"$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'postgres:x:999:' >"$root/etc/group"
printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"
chmod 700 "$root/var/lib/postgresql/data"
OWNED="999:/var/lib/postgresql 999:/var/run/postgresql" import "$PG_IMAGE" "$pg_digest" \
    "ENV PATH=$pgbin:/usr/local/bin:/bin PGDATA=/var/lib/postgresql/data" "USER 999:999" \
    "ENTRYPOINT [\"/usr/local/bin/postgres-entrypoint\"]" "EXPOSE 5432"
