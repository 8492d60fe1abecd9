# APISIX with the mtls-guard runner inside, so that APISIX can spawn it through ext-plugin.cmd.
#
#   docker build -t apisix-mtls-guard:dev .
#   docker build --build-arg APISIX_TAG=3.17.0-debian -t apisix-mtls-guard:dev .
#
# The official images contain no Python, and APISIX starts exactly one runner as a child of its
# privileged agent, so the runner has to live in the APISIX image itself (the maintainers' answer to
# "how do I ship a runner": build on top of the official image).

# A 3.x *-debian tag whose base is Debian bookworm: its apt python3 is 3.11, the minimum this project
# supports. The -debian images moved from bullseye (python3 3.9) to bookworm after 3.16.0, so
# 3.14.x/3.15.x/3.16.0-debian cannot run the runner. The *-ubuntu tags (24.04, python3 3.12) work too.
# APISIX >= 3.4 is required (client.skip_mtls_uri_regex), built with apisix-runtime, as the
# official images are.
ARG APISIX_IMAGE=apache/apisix
ARG APISIX_TAG=3.18.0-debian
FROM ${APISIX_IMAGE}:${APISIX_TAG}

# The base image ends as the unprivileged "apisix" user (uid 636); installing packages needs root.
USER root

# python3-venv brings ensurepip, so pip is available inside the virtualenv without installing pip
# system-wide. The version check fails the build early on a base image with an older Python
# (e.g. a bullseye-based tag) instead of failing later in pip with a less obvious message.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mtls-guard needs Python >= 3.11; this base image has " + sys.version.split()[0])'

# A dedicated virtualenv: our top-level packages ("runner", "plugins") have generic names, and
# APISIX passes only PATH to the runner, so ext-plugin.cmd calls /opt/mtls-guard/bin/mtls-guard by
# its absolute path. The script's shebang selects the venv's interpreter; no activation or
# VIRTUAL_ENV/PYTHONPATH/LANG variables are needed.
RUN python3 -m venv /opt/mtls-guard

# Only what the wheel is built from (pyproject.toml names README.md as the long description).
# .dockerignore keeps the rest of the context (tests, certificates, .venv) out of the build anyway.
COPY pyproject.toml README.md /tmp/mtls-guard-src/
COPY runner/ /tmp/mtls-guard-src/runner/
COPY plugins/ /tmp/mtls-guard-src/plugins/

# pip builds the wheel with hatchling in an isolated build environment, installs it and its
# dependencies (binary wheels), and byte-compiles everything now: at run time the runner is uid 636
# and cannot write into /opt. The `metrics` extra serves metrics_addr (on in conf/mtls-guard.yaml).
# The smoke test proves the console script and its imports work.
RUN set -eux; \
    /opt/mtls-guard/bin/pip install --no-cache-dir --disable-pip-version-check "/tmp/mtls-guard-src[metrics]"; \
    rm -rf /tmp/mtls-guard-src; \
    /opt/mtls-guard/bin/mtls-guard --help >/dev/null

# Socket directory for the sidecar variant (docker-compose.sidecar.yml, Helm extraContainers): a
# runner container built from this image listens here and APISIX connects through a shared volume.
# Unused when APISIX spawns the runner (it then listens in /usr/local/apisix/conf/).
RUN install -d -o apisix -g apisix -m 0770 /run/mtls-guard

# Back to the image's own user: APISIX, and the runner it spawns, run unprivileged as before.
USER apisix
