#!/usr/bin/env bash
# Fill deploy/wheelhouse/ with binary wheels of dsnode's dependencies (and of the build backend)
# for the image's Python (CPython 3.11, manylinux, this machine's architecture), using the
# host's pip and its network and TLS settings.
#
#   deploy/wheelhouse.sh [--clean]
#
# When deploy/wheelhouse/ holds wheels, the Dockerfile's build stage installs from it with
# --no-index and never touches the network: the way to build where containers cannot reach
# PyPI (no route, or a TLS-intercepting proxy whose CA only the host trusts). An empty
# wheelhouse means "download in the build stage".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dest="$here/wheelhouse"
python="${PYTHON:-python3}"

if [[ "${1:-}" == "--clean" ]]; then
    find "$dest" -name '*.whl' -delete
fi

case "$(uname -m)" in
    x86_64) arch=x86_64 ;;
    aarch64|arm64) arch=aarch64 ;;
    *) echo "wheelhouse: unsupported architecture $(uname -m)" >&2; exit 2 ;;
esac

reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$python" - "$repo/pyproject.toml" >"$reqs" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    doc = tomllib.load(f)
print("\n".join(doc["project"]["dependencies"] + doc["build-system"]["requires"]))
PY

platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_28; do
    platforms+=(--platform "${tag}_${arch}")
done

mkdir -p "$dest"
"$python" -m pip download --quiet --disable-pip-version-check --no-cache-dir \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 \
    --abi none "${platforms[@]}" --platform any \
    --dest "$dest" -r "$reqs"
echo "wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels in $dest" >&2
