#!/usr/bin/env bash
# scripts/image-test.sh — build the container image without a Docker engine and check it.
#
#   LONGRUN_IMAGE_TEST=1 scripts/image-test.sh      (ctest: `ctest -L image`)
#
# Daemonless: Debian's buildah with the vfs storage driver and chroot isolation (no
# daemon, no registry, no overlay mounts).  `FROM docker.io/library/debian:bookworm-slim`
# is satisfied by a base image made here with `debootstrap --variant=minbase bookworm`
# and tagged with that name, so the Dockerfile names the real base image and the build
# runs with --pull=never.  The base and buildah's layer cache live under
# LONGRUN_IMAGE_CACHE (default /var/tmp/longrun-image-cache), so a rerun only rebuilds
# what changed.
#
# Checks on the built image: it runs as uid 10001 (not root); the three binaries start
# (--version, --help, --check-config) and find all their shared libraries; the
# migrations and the example agents file are in place; HEALTHCHECK, the OCI labels and
# the entrypoint are recorded; no credentials in its environment.  When local servers are
# configured (LONGRUN_DATABASE_URL and LONGRUN_AMQP_URL, e.g. the test instance that
# `scripts/dev test` starts), a worker from the image runs against them on a queue of its
# own -- its HEALTHCHECK passes, /readyz says ready, SIGTERM drains it to exit 0 -- and
# `longrun migrate --status` runs from the image.
#
# Exit codes: 0 passed, 1 failed, 77 skipped (the reason is printed: the opt-in variable
# is not set, not root, buildah/debootstrap missing and not installable, or no Debian
# mirror reachable).  Prints the image size and the build time.
#
# Environment:
#   LONGRUN_IMAGE_TEST=1          opt in (the cold build takes minutes; see docs/deploy.md)
#   LONGRUN_IMAGE_CACHE=DIR       cache and buildah storage (default /var/tmp/longrun-image-cache)
#   LONGRUN_IMAGE_TAG=NAME        tag of the built image (default localhost/longrun:test)
#   LONGRUN_IMAGE_KEEP=1          keep the built image (default: removed after the checks)
#   LONGRUN_IMAGE_CACHE_MAX_MB=N  prune cached layers when the cache exceeds N MB (default 10240)
#   LONGRUN_DEBIAN_MIRROR=URL     debootstrap mirror (default http://deb.debian.org/debian)
#   LONGRUN_IMAGE_CONTEXT=DIR     build context (default: this checkout; e.g. a `git archive`
#                                 export, to build a commit while the work tree is being edited)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LONGRUN_IMAGE_CACHE:-/var/tmp/longrun-image-cache}
TAG=${LONGRUN_IMAGE_TAG:-localhost/longrun:test}
BASE=docker.io/library/debian:bookworm-slim
MIRROR=${LONGRUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
UID_EXPECTED=10001
CONTEXT=${LONGRUN_IMAGE_CONTEXT:-$ROOT}

say()  { printf 'image-test: %s\n' "$*" >&2; }
skip() { printf 'image-test: SKIPPED: %s\n' "$*" >&2; exit 77; }
fail() { printf 'image-test: FAILED: %s\n' "$*" >&2; exit 1; }

if [[ "${LONGRUN_IMAGE_TEST:-0}" != 1 ]]; then
  skip "the image build is opt-in: a cold build takes about 6 minutes (debootstrap, two apt stages, the compile), a warm one 1.5 to 2.5; run it with LONGRUN_IMAGE_TEST=1 scripts/image-test.sh or LONGRUN_IMAGE_TEST=1 ctest -L image"
fi
[[ $EUID -eq 0 ]] || skip "buildah with --isolation chroot and debootstrap need root (running as uid $EUID)"

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing buildah and debootstrap (Debian packages)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends buildah debootstrap >/dev/null 2>&1 ||
         { apt-get update >/dev/null 2>&1 &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends buildah debootstrap >/dev/null 2>&1; }; }; then
    skip "buildah/debootstrap are not installed and apt-get could not install them"
  fi
fi

mkdir -p "$CACHE"
B=(buildah --storage-driver vfs --root "$CACHE/storage" --runroot "$CACHE/run")
# Make sure no registries.conf or policy.json of the host interferes and nothing is pulled.
export BUILDAH_ISOLATION=chroot

ctr=""
cleanup() {
  if [[ -n $ctr ]]; then "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
  if [[ "${LONGRUN_IMAGE_KEEP:-0}" != 1 ]]; then "${B[@]}" rmi "$TAG" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# --- 1. the base image ------------------------------------------------------
t0=$SECONDS
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs="$CACHE/rootfs-bookworm"
  if [[ ! -f "$rootfs/.complete" ]]; then
    if ! curl -fsS -o /dev/null --max-time 20 "$MIRROR/dists/bookworm/Release"; then
      skip "no Debian mirror reachable at $MIRROR (debootstrap needs it to make the base image)"
    fi
    rm -rf "$rootfs"
    say "debootstrap --variant=minbase bookworm (once; cached in $rootfs)"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
      { tail -20 "$CACHE/debootstrap.log" >&2; fail "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    # The same apt sources as the official debian:bookworm-slim image, so that pinned
    # versions from bookworm-updates and bookworm-security resolve.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Trim as the slim image does: no apt lists, caches or docs.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
           "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
           "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    touch "$rootfs/.complete"
  fi
  say "importing the base as $BASE"
  bctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$bctr")
  tar -C "$rootfs" --exclude=./.complete -cf - . | tar -C "$mnt" -xf -
  "${B[@]}" umount "$bctr" >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash --os linux --arch amd64 "$bctr"
  "${B[@]}" commit --quiet --format docker "$bctr" "$BASE" >/dev/null
  "${B[@]}" rm "$bctr" >/dev/null
fi
say "base image ready ($((SECONDS - t0)) s)"

# --- 2. the build -------------------------------------------------------------
# vfs copies every layer whole, and each source change adds a compile layer of ~0.8 GB:
# past LONGRUN_IMAGE_CACHE_MAX_MB (default 10240) drop the untagged layers (the cached
# apt layers too; the tagged base stays).
if (( $(du -sm "$CACHE/storage" | cut -f1) > ${LONGRUN_IMAGE_CACHE_MAX_MB:-10240} )); then
  say "cache above ${LONGRUN_IMAGE_CACHE_MAX_MB:-10240} MB: pruning untagged layers"
  "${B[@]}" rm --all >/dev/null 2>&1 || true
  "${B[@]}" rmi --prune >/dev/null 2>&1 || true
fi
t1=$SECONDS
say "buildah bud (log: $CACHE/build.log)"
if ! "${B[@]}" bud --isolation chroot --pull=never --format docker --layers \
      --build-arg REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
      --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      -t "$TAG" -f "$CONTEXT/Dockerfile" "$CONTEXT" >"$CACHE/build.log" 2>&1; then
  tail -40 "$CACHE/build.log" >&2
  if grep -q "Could not resolve\|Temporary failure resolving\|Failed to fetch" "$CACHE/build.log"; then
    skip "apt-get inside the build could not reach the Debian mirror"
  fi
  if grep -q "Version '.*' for '.*' was not found" "$CACHE/build.log"; then
    fail "a pinned package version is gone from Debian's mirror: bump the pin in the Dockerfile (apt-cache policy NAME)"
  fi
  fail "buildah bud failed (log: $CACHE/build.log)"
fi
build_s=$((SECONDS - t1))

# --- 3. checks ----------------------------------------------------------------
inspect() { "${B[@]}" inspect --type image --format "$1" "$TAG"; }
size=$("${B[@]}" images --format '{{.Size}}' "$TAG" | head -1)

user=$(inspect '{{.Docker.Config.User}}')
[[ $user == "$UID_EXPECTED:$UID_EXPECTED" || $user == "$UID_EXPECTED" ]] || fail "image USER is '$user', want $UID_EXPECTED"
hc=$(inspect '{{if .Docker.Config.Healthcheck}}{{.Docker.Config.Healthcheck.Test}}{{end}}')
[[ $hc == *"/healthz"* ]] || fail "no HEALTHCHECK on /healthz recorded (got '$hc'; build with --format docker)"
ep=$(inspect '{{.Docker.Config.Entrypoint}}')
[[ $ep == '[/usr/local/bin/longrun-worker]' ]] || fail "entrypoint is $ep"
labels=$(inspect '{{range $k, $v := .Docker.Config.Labels}}{{$k}}={{$v}}
{{end}}')
for l in title description version revision created base.name; do
  grep -q "^org.opencontainers.image.$l=." <<<"$labels" || fail "OCI label org.opencontainers.image.$l missing"
done
env=$(inspect '{{range .Docker.Config.Env}}{{.}}
{{end}}')
if grep -qiE '://[^/"]*:[^/"@]*@|PASSWORD|SECRET|TOKEN|API_KEY' <<<"$env"; then
  fail "the image environment carries something that looks like a credential: $env"
fi

ctr=$("${B[@]}" from --pull=never "$TAG")
run() { "${B[@]}" run --isolation chroot "$ctr" -- "$@"; }
uid=$(run id -u)
[[ $uid == "$UID_EXPECTED" ]] || fail "processes run as uid $uid, want $UID_EXPECTED"
missing=$(run sh -c 'for b in /usr/local/bin/longrun /usr/local/bin/longrun-worker /usr/local/bin/longrun-scheduler; do ldd "$b"; done' | grep 'not found' || true)
[[ -z $missing ]] || fail "unresolved shared libraries: $missing"
v=$(run longrun-worker --version); say "$v"
[[ $v == "longrun-worker "* ]] || fail "longrun-worker --version printed '$v'"
run longrun-scheduler --version >/dev/null || fail "longrun-scheduler --version"
run longrun-worker --help | grep -q 'usage: longrun-worker' || fail "longrun-worker --help"
run longrun-scheduler --help | grep -q 'usage: longrun-scheduler' || fail "longrun-scheduler --help"
run longrun --help | grep -q 'migrate' || fail "longrun --help"
run sh -c 'LONGRUN_FIXTURE_URL=http://fixture.invalid LONGRUN_AGENTS_FILE=/usr/share/longrun/examples/agents.json longrun-worker --check-config' |
  grep -q 'configuration ok' || fail "longrun-worker --check-config with the example agents file"
n=$(run sh -c 'ls /usr/share/longrun/migrations/*.sql | wc -l')
[[ $n -ge 1 ]] || fail "no migrations in /usr/share/longrun/migrations"
run sh -c 'test ! -w /usr/local/bin/longrun-worker && test ! -w /usr/share/longrun/migrations' ||
  fail "the non-root user can write the binaries or migrations"
run sh -c 'command -v gcc cc cmake' >/dev/null 2>&1 && fail "build tools leaked into the runtime image"
# What k8s/ relies on: /bin/sleep for the worker's preStop, curl for HEALTHCHECK and runbooks.
run sh -c 'test -x /bin/sleep && curl --version >/dev/null' || fail "/bin/sleep or curl missing"

if [[ -n "${LONGRUN_DATABASE_URL:-}" && -n "${LONGRUN_AMQP_URL:-}" ]]; then
  # A worker from the image against the local servers (chroot isolation shares the host's
  # network), on a queue of its own so it takes no one else's tasks: the HEALTHCHECK
  # command passes, /readyz says ready, and SIGTERM drains it to exit 0.
  port=$((20000 + RANDOM % 20000))
  hc_cmd=$(inspect '{{range $i, $a := .Docker.Config.Healthcheck.Test}}{{if $i}}{{$a}}{{end}}{{end}}')
  script=$(cat <<EOF
longrun-worker --queue image-test-$$ >/tmp/worker.log 2>&1 &
pid=\$!
hc=fail; ready=fail
for i in \$(seq 100); do
  if sh -c '$hc_cmd' 2>/dev/null; then hc=ok; break; fi
  sleep 0.1
done
for i in \$(seq 100); do
  if curl -fs -o /dev/null "http://127.0.0.1:$port/readyz"; then ready=ok; break; fi
  sleep 0.1
done
kill -TERM \$pid; wait \$pid; rc=\$?
echo "healthcheck=\$hc readyz=\$ready exit=\$rc"
grep -o '"event":"worker\.[a-z_]*"' /tmp/worker.log | tr '\n' ' '; echo
EOF
)
  out=$(run env LONGRUN_DATABASE_URL="$LONGRUN_DATABASE_URL" LONGRUN_AMQP_URL="$LONGRUN_AMQP_URL" \
        LONGRUN_HTTP_PORT="$port" LONGRUN_WORKER_ID="image-test-$$" LONGRUN_DRAIN_SECONDS=5 sh -c "$script" 2>&1) || true
  say "worker from the image: $(tr '\n' ' ' <<<"$out")"
  [[ $out == *"healthcheck=ok readyz=ok exit=0"* ]] ||
    fail "the worker in the image did not pass its HEALTHCHECK, get ready, and drain to exit 0 on SIGTERM"
fi

if [[ -n "${LONGRUN_DATABASE_URL:-}" ]]; then
  # chroot isolation shares the host's network: the image's CLI talks to the local server.
  if out=$(run env LONGRUN_DATABASE_URL="$LONGRUN_DATABASE_URL" longrun migrate --status 2>&1); then
    say "longrun migrate --status from the image:"; printf '%s\n' "$out" | sed 's/^/  /' >&2
  elif [[ $out == *"newer than this binary knows"* ]]; then
    # Connected and read schema_migrations: a newer binary migrated that database.
    say "longrun migrate --status from the image reached PostgreSQL: $out"
  else
    fail "longrun migrate --status from the image against \$LONGRUN_DATABASE_URL: $out"
  fi
fi

# The archive that `kind load image-archive` / `minikube image load` take (docs/deploy.md).
archive="$CACHE/longrun-image.tar"
rm -f "$archive"
"${B[@]}" push --quiet "$TAG" "docker-archive:$archive:localhost/longrun:dev" >/dev/null ||
  fail "buildah push to a docker-archive failed"
tar -tf "$archive" | grep -qx manifest.json || fail "$archive is not a docker archive (no manifest.json)"
gz=$(gzip -1 -c "$archive" | wc -c)
say "docker-archive $archive: $(( $(stat -c %s "$archive") / 1048576 )) MiB, $((gz / 1048576)) MiB gzipped (about what a registry stores)"
rm -f "$archive"

say "image $TAG: size $size, build ${build_s} s (base $((t1 - t0)) s), total $((SECONDS - t0)) s"
say "passed"
