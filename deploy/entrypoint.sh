#!/bin/sh
# Container entrypoint: choose the config file, then exec the node so that it replaces this
# shell as PID 1 and receives SIGTERM from `docker stop` directly.
#
#   (no args) | serve [FLAGS...] | -FLAG...   ->  exec dsnode serve --config FILE [FLAGS...]
#   anything else (dsnode status ..., sh)       ->  exec it unchanged
#
# The config file is $DSNODE_CONFIG when set (it must exist), else /etc/dsnode/dsnode.toml when
# present (the image ships one for a single node; compose mounts a per-node file over it), else
# none: flags and DSNODE_* variables alone. DSNODE_* variables override the file, flags override
# both (PROTOCOL.md, "Launching a node").
# POSIX sh on purpose: the official python image and the debootstrap base both have /bin/sh.
set -eu

default_config="${DSNODE_DEFAULT_CONFIG:-/etc/dsnode/dsnode.toml}"

if [ "$#" -eq 0 ]; then
    set -- serve
elif [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi

if [ "$1" != "serve" ]; then
    exec "$@"
fi
shift

if [ -n "${DSNODE_CONFIG:-}" ]; then
    config="$DSNODE_CONFIG"
    if [ ! -r "$config" ]; then
        echo "dsnode-entrypoint: DSNODE_CONFIG=$config is not a readable file" >&2
        exit 2
    fi
elif [ -r "$default_config" ]; then
    config="$default_config"
else
    config=""
fi

# DSNODE_AUTO_CERTS=ID[,ID...]: make a development CA, node certificates and tokens in
# $DSNODE_AUTO_CERTS_DIR (default /var/lib/dsnode/tls) unless they are there already
# (`dsnode certs --if-missing`). The image sets it for its one-node default configuration.
if [ -n "${DSNODE_AUTO_CERTS:-}" ]; then
    dsnode certs --if-missing --out "${DSNODE_AUTO_CERTS_DIR:-/var/lib/dsnode/tls}" \
        --nodes "$DSNODE_AUTO_CERTS"
fi

# The server also reads DSNODE_CONFIG; pass the choice explicitly and drop the variable so the
# two can never disagree.
unset DSNODE_CONFIG
if [ -n "$config" ]; then
    exec dsnode serve --config "$config" "$@"
fi
exec dsnode serve "$@"
