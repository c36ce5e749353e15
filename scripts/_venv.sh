# Sourced by the other scripts: make ./.venv with dsnode installed (and extras in $1).
# Works on a fresh Debian machine with only python3 (3.11+): installs python3-venv if needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DSNODE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
extras="${1:-}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "dsnode needs Python >= 3.11 as '$PY' (set PYTHON=...)" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        echo "python3-venv is missing; installing it from Debian's packages" >&2
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq python3-venv python3-pip >/dev/null
        "$PY" -m venv "$VENV"
    fi
fi
stamp="$VENV/.dsnode-installed$extras"
if [ -z "$extras" ] && [ -f "$VENV/.dsnode-installed[test]" ] &&
   [ ! "$ROOT/pyproject.toml" -nt "$VENV/.dsnode-installed[test]" ]; then
    stamp="$VENV/.dsnode-installed[test]"  # installed with the test extras: a superset
fi
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
           "$VENV/bin/python" -m pip install -e "$ROOT$extras"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "installing dsnode into $VENV failed; the full log is $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
