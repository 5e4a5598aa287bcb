#!/usr/bin/env bash
# Builds the image `muse-majordomo:local` (IMAGE to change it) from nothing, without a
# registry or a second Rust build: the host-built release binaries muse, majordomo and mm,
# exactly the shared libraries `ldd` names for them (the dynamic loader included), a
# passwd/group naming the unprivileged user, and an nsswitch.conf (glibc's getaddrinfo reads
# /etc/hosts, then Docker's DNS through the resolv.conf Docker mounts). No CA certificates:
# every TLS client in the binaries (reqwest, hf-hub, mm's https://) carries webpki-roots.
# No shell, no Python: models come from the host's Hugging Face cache, mounted read-only at
# /hf/hub (deploy/compose.yaml, deploy/cluster-test.sh).
#
#   deploy/image.sh        build if anything changed (idempotent: seconds), print the image name
#
# Missing binaries are built first (cargo build --release --workspace).
set -euo pipefail
self="$(readlink -f "$0")"
cd "$(dirname "$self")/.."
IMAGE="${IMAGE:-muse-majordomo:local}"
bins=(target/release/muse target/release/majordomo target/release/mm)

for b in "${bins[@]}"; do
    if [[ ! -x "$b" ]]; then
        echo "image.sh: $b is missing: cargo build --release --workspace" >&2
        cargo build --release --workspace >&2
        break
    fi
done

# The libraries the binaries load, as ldd resolves them on this host. "not found" is fatal:
# the image would not start.
libs() {
    local b
    for b in "${bins[@]}"; do
        if ldd "$b" | grep -q "not found"; then
            ldd "$b" >&2
            echo "image.sh: $b needs a library this host lacks" >&2
            exit 1
        fi
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)"
        ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
    done | sort -u
}
libs >/dev/null # fail here, not inside the substitution below
mapfile -t lib_paths < <(libs)

# The image carries its inputs' digest as a label: unchanged inputs, no rebuild.
digest="$({
    sha256sum "${bins[@]}" "$self"
    printf '%s\n' "${lib_paths[@]}"
    for l in "${lib_paths[@]}"; do sha256sum "$(readlink -f "$l")"; done
} | sha256sum | cut -c1-32)"
if [[ "$(docker image inspect -f '{{index .Config.Labels "mm.inputs"}}' "$IMAGE" 2>/dev/null || true)" == "$digest" ]]; then
    echo "$IMAGE"
    exit 0
fi

root=target/image-root
rm -rf "$root" "$root.tar"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/data" "$root/hf"
cp "${bins[@]}" "$root/usr/local/bin/"
for l in "${lib_paths[@]}"; do
    # Each at the path the binary asks for (the loader's path is written in the ELF header);
    # -L: the file itself, not the host's symlink to it.
    mkdir -p "$root$(dirname "$l")"
    cp -L "$l" "$root$l"
done
printf '%s\n' 'root:x:0:0:root:/:/nonexistent' 'mm:x:10001:10001:muse-majordomo:/data:/nonexistent' >"$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'mm:x:10001:' >"$root/etc/group"
printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"
# docker import keeps the archive's owners: everything is root's but /data (a redb store, if
# one is used there), which is the service user's. tar sets the owners, so no chown: this
# runs without root too.
tar -C "$root" -cf "$root.tar" --owner=0 --group=0 --numeric-owner --exclude=./data .
tar -C "$root" -rf "$root.tar" --owner=10001 --group=10001 --numeric-owner ./data
# HF_HUB_OFFLINE: a missing model is an error naming it, not a download from inside a
# container (fetch on the host: python3 deploy/fetch_models.py). The command picks the role:
# muse serve | majordomo serve | mm serve.
docker import \
    -c "ENV PATH=/usr/local/bin HF_HOME=/hf HF_HUB_OFFLINE=1" \
    -c "USER 10001:10001" -c "WORKDIR /data" \
    -c "EXPOSE 50050 50051 50052 50080" \
    -c "LABEL mm.inputs=$digest" \
    -m "deploy/image.sh: host-built binaries and their libraries" \
    "$root.tar" "$IMAGE" >/dev/null
rm -rf "$root" "$root.tar"
echo "$IMAGE"
