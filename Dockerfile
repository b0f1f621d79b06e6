# syntax=docker/dockerfile:1
#
# longrun: one image holding longrun-worker, longrun-scheduler and the longrun CLI,
# plus the SQL migrations and the example agents file.
#
#   Build (daemonless, as the project's own check does; see docs/deploy.md):
#     buildah bud --storage-driver vfs --isolation chroot --pull=never --format docker \
#       --layers -t longrun:0.1.0 .
#   or with a Docker engine:
#     docker build -t longrun:0.1.0 .
#   Check it:        LONGRUN_IMAGE_TEST=1 scripts/image-test.sh   (ctest -L image)
#
# Two stages: "build" has the compilers and the -dev packages; the runtime stage has only
# the shared libraries the binaries link against, ca-certificates (TLS to model providers,
# amqps://, sslmode=verify-full) and curl (the HEALTHCHECK), and runs as uid 10001.
#
# Package versions are pinned to Debian 12 (bookworm, bookworm-updates, bookworm-security)
# so that a rebuild gives the same image.  Debian drops superseded versions from its
# mirrors when a point or security release lands; the build then fails at apt-get with
# "Version ... not found", and the fix is to bump the pin:
#     apt-cache policy libpq5 libcurl4 ...   (on a bookworm machine, after apt-get update)
#
# No secrets are baked in: connection URLs (with their passwords) come from the
# environment at run time (Kubernetes Secrets, see k8s/base).

ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

# ---------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS build

ARG DEBIAN_FRONTEND=noninteractive
# The Release build is -Werror clean too (checked at -O3); --build-arg LONGRUN_WERROR=OFF
# is an escape hatch for a newer compiler's new warnings.
ARG LONGRUN_WERROR=ON
# The commit shown by --version and longrun_build_info (the context has no .git):
#   --build-arg LONGRUN_COMMIT=$(git rev-parse --short=12 HEAD); "unknown" without it.
ARG LONGRUN_COMMIT=

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential=12.9 \
      cmake=3.25.1-1 \
      pkg-config=1.8.1-1 \
      libuv1-dev=1.44.2-1+deb12u1 \
      libcurl4-openssl-dev=7.88.1-10+deb12u15 \
      libpq-dev=15.20-0+deb12u1 \
      librabbitmq-dev=0.11.0-1+deb12u3 \
      libcjson-dev=1.7.15-1+deb12u4 \
      libmicrohttpd-dev=0.9.75-6 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# .dockerignore keeps build trees, local service data, docs and tests (but their CMake
# files) out of the context.
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLONGRUN_WERROR=${LONGRUN_WERROR} \
      -DLONGRUN_COMMIT=${LONGRUN_COMMIT} \
 && cmake --build build -j2 --target longrun-worker longrun-scheduler longrun \
 && strip --strip-unneeded build/longrun-worker build/longrun-scheduler build/longrun \
 && build/longrun-worker --version && build/longrun-scheduler --version

# ---------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="longrun" \
      org.opencontainers.image.description="Durable runtime for long-running LLM agent tasks: longrun-worker, longrun-scheduler and the longrun CLI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim" \
      org.opencontainers.image.documentation="docs/deploy.md"

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libuv1=1.44.2-1+deb12u1 \
      libcurl4=7.88.1-10+deb12u15 \
      libpq5=15.20-0+deb12u1 \
      librabbitmq4=0.11.0-1+deb12u3 \
      libcjson1=1.7.15-1+deb12u4 \
      libmicrohttpd12=0.9.75-6 \
      ca-certificates=20250419~deb12u2 \
      curl=7.88.1-10+deb12u15 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 10001 longrun \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin longrun

COPY --from=build /src/build/longrun-worker /src/build/longrun-scheduler /src/build/longrun /usr/local/bin/
COPY migrations/ /usr/share/longrun/migrations/
COPY examples/agents.json /usr/share/longrun/examples/agents.json

# Defaults for a container; every LONGRUN_* variable is documented in
# docs/configuration.md.  LONGRUN_HTTP_PORT serves /healthz, /readyz and /metrics (issue 7).
ENV LONGRUN_HTTP_PORT=8080 \
    LONGRUN_LOG_FORMAT=json

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# Docker/Podman only (Kubernetes ignores HEALTHCHECK and uses the probes in k8s/base):
# liveness of the worker or scheduler on its health port.  The CLI does not serve it, so
# run one-shot CLI containers with --no-healthcheck (or ignore their health status).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD curl -fsS -o /dev/null "http://127.0.0.1:${LONGRUN_HTTP_PORT}/healthz" || exit 1

ENTRYPOINT ["/usr/local/bin/longrun-worker"]
