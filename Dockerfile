# dsnode container image.
#
#   docker build -t dsnode:local .                                   # official python base
#   docker build --build-arg BASE_IMAGE=dsnode-base:bookworm -t dsnode:local .   # offline base
#
# BASE_IMAGE is any image with Python >= 3.11 and the venv module: python:3.11-slim (python at
# /usr/local) or the debootstrap image from deploy/build-base-image.sh (Debian's /usr/bin/python3).
# Both stages use `python3 -m venv`, so the same steps work on either, and Debian's
# "externally managed" system Python is never touched.
# Written for the classic builder as well as BuildKit: no syntax directive (it would pull an
# image) and no RUN --mount.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: wheels for everything
FROM ${BASE_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/build

WORKDIR /src

# deploy/wheelhouse/ holds wheels from deploy/wheelhouse.sh when the build must not use the
# network (then pip runs with --no-index); when it is empty, pip downloads from PyPI.
COPY deploy/wheelhouse/ /wheelhouse/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then echo --no-index >/etc/pip-index-flag; \
    else : >/etc/pip-index-flag; fi

# Dependencies first, from pyproject.toml alone: editing dsnode/ does not rebuild them.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/build/bin/pip wheel $(cat /etc/pip-index-flag) --find-links /wheelhouse \
        --only-binary=:all: --wheel-dir /wheels/deps -r requirements.txt

# (README.md is left out on purpose: the wheel builds without it, and docs edits keep the cache.)
COPY dsnode ./dsnode
RUN /opt/build/bin/pip wheel $(cat /etc/pip-index-flag) --find-links /wheelhouse \
        --no-deps --wheel-dir /wheels/app . \
    && ls -l /wheels/*

# The classic builder leaves this stage's image untagged; the label lets tooling (the container
# tests) find and remove it. Last in the stage, so it never costs a cache miss above.
ARG DSNODE_BUILD_ID=
LABEL org.dsnode.build-id="${DSNODE_BUILD_ID}"

# ---------------------------------------------------------------- runtime: venv from the wheels
FROM ${BASE_IMAGE} AS runtime

ARG BASE_IMAGE
LABEL org.opencontainers.image.title="dsnode" \
      org.opencontainers.image.description="dsnode replicated key-value store node" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# A fixed uid/gid so that volumes and bind mounts can be prepared on the host.
RUN groupadd --system --gid 10001 dsnode \
    && useradd --system --uid 10001 --gid dsnode --home-dir /var/lib/dsnode --no-create-home \
        --shell /usr/sbin/nologin dsnode \
    && mkdir -p /var/lib/dsnode /etc/dsnode/tls \
    && chown dsnode:dsnode /var/lib/dsnode /etc/dsnode/tls \
    && chmod 0750 /var/lib/dsnode /etc/dsnode/tls

# Install from the wheels only (--no-index: no network here), in two layers so that a change
# to dsnode's code reinstalls only dsnode. The venv gets no pip of its own (the base image's pip
# installs into it with --python): nothing is ever installed into a running container.
COPY --from=build /wheels/deps /tmp/wheels/deps
RUN python3 -m venv --without-pip /opt/dsnode \
    && python3 -m pip --python /opt/dsnode/bin/python install --no-index --no-cache-dir \
        --disable-pip-version-check --no-warn-script-location /tmp/wheels/deps/*.whl \
    && rm -rf /tmp/wheels
COPY --from=build /wheels/app /tmp/wheels/app
RUN python3 -m pip --python /opt/dsnode/bin/python install --no-index --no-cache-dir \
        --disable-pip-version-check --no-deps /tmp/wheels/app/*.whl \
    && rm -rf /tmp/wheels \
    && /opt/dsnode/bin/python -c 'import dsnode.cli, dsnode.runtime.main' \
    && test -x /opt/dsnode/bin/dsnode

COPY deploy/entrypoint.sh /usr/local/bin/dsnode-entrypoint
COPY deploy/healthcheck.py /usr/local/lib/dsnode/healthcheck.py
COPY config/container.toml /etc/dsnode/dsnode.toml

# DSNODE_AUTO_CERTS: the entrypoint makes certificates and tokens for the default one-node
# configuration on first start (compose sets it empty and uses its `certs` service instead).
ENV PATH=/opt/dsnode/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DSNODE_AUTO_CERTS=n1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8

USER dsnode
WORKDIR /var/lib/dsnode
VOLUME /var/lib/dsnode
EXPOSE 7379

STOPSIGNAL SIGTERM
# healthcheck.py asks GET /readyz on the node's admin listener (metrics_listen, set to
# 127.0.0.1:9379 by config/container.toml and the compose files), and falls back to
# `dsnode status` when a config turns the listener off. See deploy/healthcheck.py for why.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/dsnode/bin/python", "/usr/local/lib/dsnode/healthcheck.py"]

ENTRYPOINT ["/usr/local/bin/dsnode-entrypoint"]
CMD ["serve"]

ARG DSNODE_BUILD_ID=
LABEL org.dsnode.build-id="${DSNODE_BUILD_ID}"
