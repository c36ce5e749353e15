#!/usr/bin/env bash
# Build a minimal Debian base image with Python 3.11 without any container registry.
#
#   deploy/build-base-image.sh [--force] [--image NAME:TAG] [--suite SUITE]
#
# debootstrap writes a Debian root file system (minbase + python3, python3-venv, python3-pip)
# from the machine's own Debian mirror, and `docker import` turns it into an image. The result
# works as BASE_IMAGE for the Dockerfile:
#
#   BASE_IMAGE=dsnode-base:bookworm docker-compose up --build -d
#
# Idempotent and cached: an existing image is kept unless --force is given; the root file system
# tarball is cached in $DSNODE_BASE_CACHE (default ~/.cache/dsnode) so that a removed image is
# re-imported in seconds. Environment: DEBIAN_MIRROR overrides the mirror read from
# /etc/apt/sources.list{,.d/*}. Needs root, debootstrap and a Docker engine.
set -euo pipefail

image="${DSNODE_BASE_IMAGE:-dsnode-base:bookworm}"
suite="bookworm"
force=0
packages="python3,python3-venv,python3-pip,ca-certificates,tzdata"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) force=1 ;;
        --image) image="$2"; shift ;;
        --suite) suite="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-base-image: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

log() { echo "build-base-image: $*" >&2; }

if [[ $force -eq 0 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    log "image $image exists; nothing to do (use --force to rebuild)"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "debootstrap needs root"
    exit 2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        log "installing debootstrap from the Debian archive"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            debootstrap >/dev/null
    else
        log "debootstrap is missing and there is no apt-get to install it"
        exit 2
    fi
fi

# The first Debian mirror configured for apt (deb822 .sources files or one-line sources.list).
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        awk '
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { if (uri != "" && suites ~ /(^| )'"$suite"'( |$)/) { print uri; exit }
                         uri = ""; suites = ""; next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { $1 = ""; suites = $0 }
            END { if (uri != "" && suites ~ /(^| )'"$suite"'( |$)/) print uri }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        awk '$1 == "deb" && $0 !~ /^[ \t]*#/ {
                 i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                 if ($(i + 1) == "'"$suite"'") { print $i; exit }
             }' "$f"
    done
}

mirror="${DEBIAN_MIRROR:-$(find_mirror | head -n 1)}"
mirror="${mirror:-http://deb.debian.org/debian}"

cache_dir="${DSNODE_BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsnode}"
key="$(printf '%s|%s' "$suite" "$packages" | sha256sum | cut -c1-12)"
tarball="$cache_dir/base-$suite-$key.tar"
mkdir -p "$cache_dir"

# One build at a time on this machine (parallel test runs share the cache).
exec 9>"$cache_dir/.lock"
flock 9

if [[ $force -eq 0 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    log "image $image appeared while waiting for the lock; nothing to do"
    exit 0
fi

if [[ $force -eq 1 || ! -s "$tarball" ]]; then
    work="$(mktemp -d /var/tmp/dsnode-base.XXXXXX)"
    rootfs="$work/rootfs"
    cleanup() {
        # debootstrap may leave /proc or /sys mounted inside the chroot when it fails.
        local m
        for m in proc sys dev/pts dev; do
            if mountpoint -q "$rootfs/$m" 2>/dev/null; then umount -l "$rootfs/$m" || true; fi
        done
        rm -rf "$work"
    }
    trap cleanup EXIT

    log "debootstrap $suite from $mirror (packages: $packages)"
    debootstrap --variant=minbase --components=main --include="$packages" \
        "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        log "debootstrap failed (full log above, last 30 lines)"
        exit 1
    }

    # Keep apt usable inside the image (same mirror), drop caches and documentation.
    printf 'deb %s %s main\n' "$mirror" "$suite" >"$rootfs/etc/apt/sources.list"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/tmp/* "$rootfs"/root/.cache
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
        -exec rm -rf {} + 2>/dev/null || true
    find "$rootfs/usr/lib/python3" "$rootfs/usr/lib/python3.11" -name __pycache__ -type d \
        -prune -exec rm -rf {} + 2>/dev/null || true
    # No policy-rc.d games needed: nothing in the image starts services.

    log "packing root file system into $tarball"
    tar --numeric-owner --xattrs -C "$rootfs" \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
else
    log "reusing cached root file system $tarball"
fi

log "importing $tarball as $image"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.opencontainers.image.title=dsnode-base org.opencontainers.image.base.name=debian:$suite" \
    --change 'CMD ["python3"]' \
    "$tarball" "$image" >/dev/null

docker run --rm "$image" python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)'
log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
