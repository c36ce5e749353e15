#!/usr/bin/env bash
# The docker compose cluster with no container registry: build the base image locally with
# debootstrap (cached), fill deploy/wheelhouse/ from the host's pip, build dsnode on that base
# and start the three nodes.
#
#   deploy/compose-offline.sh [up] [--timeout SECONDS] [--no-wait]
#                                       build if needed, start, wait until all are healthy
#   deploy/compose-offline.sh down [-v] any other compose command, with the same settings
#   deploy/compose-offline.sh ps | logs -f node1 | restart | ...
#
# Environment: BASE_IMAGE (default dsnode-base:bookworm), DSNODE_IMAGE, DSNODE_PORT1..3,
# DSNODE_BIND, DSNODE_HEALTH_INTERVAL, COMPOSE_PROJECT_NAME: see docker-compose.yml.
# DSNODE_WHEELHOUSE=0 skips the wheelhouse (the build stage then downloads from PyPI).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

export BASE_IMAGE="${BASE_IMAGE:-dsnode-base:bookworm}"
# Let compose v1 build through the docker CLI: same builder and cache as `docker build`.
export COMPOSE_DOCKER_CLI_BUILD="${COMPOSE_DOCKER_CLI_BUILD:-1}"

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "compose-offline: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 2
fi

log() { echo "compose-offline: $*" >&2; }

action="${1:-up}"
if [[ "$action" != "up" ]]; then
    exec "${compose[@]}" "$@"
fi
[[ $# -gt 0 ]] && shift

timeout=180
wait=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --timeout) timeout="$2"; shift ;;
        --no-wait) wait=0 ;;
        *) log "unknown argument for up: $1"; exit 2 ;;
    esac
    shift
done

if [[ "$BASE_IMAGE" == dsnode-base:* ]]; then
    "$here/build-base-image.sh" --image "$BASE_IMAGE"
fi
if [[ "${DSNODE_WHEELHOUSE:-1}" != "0" ]]; then
    "$here/wheelhouse.sh"
fi

started=$(date +%s)
"${compose[@]}" up --build --detach
[[ $wait -eq 1 ]] || exit 0

log "waiting up to ${timeout}s for every node to become healthy"
deadline=$((started + timeout))
while :; do
    mapfile -t ids < <("${compose[@]}" ps -q)
    states=()
    for id in "${ids[@]}"; do
        states+=("$(docker inspect -f '{{.Name}}={{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")")
    done
    pending=0
    for s in "${states[@]}"; do
        [[ "$s" == *=healthy ]] || pending=1
    done
    if [[ ${#ids[@]} -gt 0 && $pending -eq 0 ]]; then
        log "all healthy after $(( $(date +%s) - started ))s: ${states[*]}"
        "${compose[@]}" ps
        exit 0
    fi
    if [[ $(date +%s) -ge $deadline ]]; then
        log "not healthy after ${timeout}s: ${states[*]}"
        "${compose[@]}" logs --tail 30 >&2 || true
        exit 1
    fi
    sleep 1
done
