#!/bin/sh
# Builds ./producer (or $1) offline, in GOPATH mode, against Debian's packaged amqp091-go:
#   apt-get install golang-go golang-github-rabbitmq-amqp091-go-dev
# Debian installs the library's source under /usr/share/gocode/src; GOPATH mode finds it
# there with no go.mod, no go.sum and no module proxy. (An offline module-mode build would
# need a replace directive to that directory for amqp091-go and for each module its go.mod
# requires, go.uber.org/goleak among them; with the module proxy, see README.md.)
set -eu
cd "$(dirname "$0")"
out=${1:-producer}
if [ ! -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go ]; then
  echo "build.sh: /usr/share/gocode/src/github.com/rabbitmq/amqp091-go is missing (apt-get install golang-github-rabbitmq-amqp091-go-dev)" >&2
  exit 1
fi
export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS=
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
  export GOCACHE="${TMPDIR:-/tmp}/longrun-go-build-cache" # go needs a build cache directory
fi
exec go build -o "$out" .
