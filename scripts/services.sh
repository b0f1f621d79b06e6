#!/usr/bin/env bash
# scripts/services.sh — local RabbitMQ + PostgreSQL for longrun development and tests.
#
# Works in a plain container: no systemd, no init system, no system-wide
# instance is used or touched.  Every process is a plain background process
# owned by this script, with all state under one directory:
#
#   LONGRUN_HOME = ${LONGRUN_HOME:-<repo>/.longrun}     (repo = parent of scripts/)
#   ├── .lock                 flock(1) lock serialising up/down/start/stop/reset
#   ├── ports.env             ports last used by `up`/`start-*` (so `env`, `down`
#   │                         and `status` find the instance without the env vars)
#   ├── postgres/             owned by the `postgres` user when run as root
#   │   ├── data/             PGDATA (initdb --auth=trust, UTF8, C.UTF-8 locale)
#   │   ├── sock/             unix_socket_directories
#   │   └── log/postgres.log  server log (pg_ctl -l)
#   └── rabbitmq/             owned by the invoking user (root in the container)
#       ├── home/             $HOME of the node and of our CLI calls: .erlang.cookie
#       ├── mnesia/           RABBITMQ_MNESIA_BASE (node database, plugin expansion)
#       ├── log/              RABBITMQ_LOG_BASE (<node>.log)
#       ├── server.out        stdout/stderr of rabbitmq-server
#       ├── rabbitmq.pid      pid of the Erlang VM (beam)
#       ├── rabbitmq.conf     RABBITMQ_CONFIG_FILE (regenerated on every start)
#       ├── enabled_plugins   RABBITMQ_ENABLED_PLUGINS_FILE ([rabbitmq_management])
#       └── rabbitmq-env.conf RABBITMQ_CONF_ENV_FILE (empty: shields us from
#                             /etc/rabbitmq/rabbitmq-env.conf)
#
# Port scheme (everything listens on 127.0.0.1 only).  With P = AMQP port:
#   PostgreSQL          LONGRUN_DEV_PG_PORT           default 55432
#   AMQP                LONGRUN_DEV_AMQP_PORT = P     default 55672
#   management HTTP     LONGRUN_DEV_AMQP_MGMT_PORT    default P + 100  (55772)
#   private epmd        LONGRUN_DEV_EPMD_PORT         default P + 200  (55872)
#   Erlang distribution LONGRUN_DEV_AMQP_DIST_PORT    default P + 300  (55972)
#   node name           longrun<P>@localhost
# Offsets of 100 (rather than RabbitMQ's usual +20000, which would exceed 65535
# here) mean that instances whose AMQP ports lie within one block of 100
# (e.g. dev 55672 and test 55673) never collide; P must be <= 65235.  The
# RabbitMQ CLI tools use ephemeral ports for their own distribution listener.
# Because the node uses its own epmd port (ERL_EPMD_PORT), its own node name,
# cookie ($HOME) and config, it never sees nor disturbs a system instance on
# 4369/5672/25672 or a second longrun instance with another LONGRUN_HOME.
# Precedence for every port: explicit env var > LONGRUN_HOME/ports.env > default.
# These ports lie in Linux's ephemeral range: as root, `up` adds them to
# net.ipv4.ip_local_reserved_ports so that no outgoing connection takes one
# (a leftover TIME-WAIT socket on the distribution port stops RabbitMQ from
# starting); without root it waits for such sockets to close.
#
# stdout carries only the `export ...` lines (so `eval "$(scripts/services.sh up)"`
# works); all progress and error messages go to stderr.  `status` prints to stdout.
#
# PostgreSQL refuses to run as root, so when invoked as root the server tools
# run as the `postgres` system user (runuser).  RabbitMQ runs as the invoking
# user, directly from /usr/lib/rabbitmq/bin (the Debian /usr/sbin wrappers
# would `su rabbitmq` and use /var/lib/rabbitmq's cookie and the system epmd).
set -euo pipefail

# ---------------------------------------------------------------------------
# Debian packages for building, running and testing longrun (`deps`).
# Add to this list; keep one package per line.
DEPS_PACKAGES=(
  build-essential
  cmake
  pkg-config
  git
  clang
  clang-format
  libclang-rt-14-dev
  llvm
  librabbitmq-dev
  libpq-dev
  libcurl4-openssl-dev
  libcjson-dev
  libuv1-dev
  libmicrohttpd-dev
  rabbitmq-server
  postgresql
  postgresql-contrib
  valgrind
  python3-pika
  python3-jsonschema
  python3-prometheus-client
  python3-psycopg2
  procps
  iproute2
  curl
  ca-certificates
  python3-yaml
  prometheus
  # the example producers (examples/producers/): Python's client is python3-pika above;
  # Go and its AMQP client, which Go builds offline from /usr/share/gocode (GOPATH mode).
  # Node.js and npm: see deps_node.
  golang-go
  golang-github-rabbitmq-amqp091-go-dev
)
# ---------------------------------------------------------------------------

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

# fd 3 = the real stdout (export lines, status); fd 1 -> stderr for everything
# else, so no tool's chatter can end up in an `eval`.  Long-lived children must
# be started with `3>&- 9>&-` so they do not keep the caller's pipe (or our
# lock) open.
exec 3>&1 1>&2

say()  { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*"; }
die()  { printf '%s: error: %s\n' "$PROG" "$*"; exit 1; }
out()  { printf '%s\n' "$*" >&3; }

usage() {
  cat >&3 <<EOF
Usage: $PROG <command> [args]

Local RabbitMQ + PostgreSQL for longrun (no systemd needed).

Commands:
  deps               apt-get install build/runtime/test dependencies (skips if present),
                     and npm ci for examples/producers/node and tests/mcp-everything (skips if up to date)
  up                 start PostgreSQL and RabbitMQ (idempotent); prints export lines
  env                print the export lines only (starts nothing)
  status             show whether each service runs; exit 0 iff both are up
  down               stop both services (idempotent)
  start-postgres     start PostgreSQL only       stop-postgres     stop it (-m fast)
  start-rabbitmq     start RabbitMQ only         stop-rabbitmq     stop it (rabbitmqctl stop)
  restart-postgres   stop + start PostgreSQL     restart-rabbitmq  stop + start RabbitMQ
  kill-postgres      crash PostgreSQL (pg_ctl stop -m immediate, for chaos tests)
  kill-rabbitmq      crash RabbitMQ (SIGKILL the Erlang VM, for chaos tests)
  reset              down, then delete LONGRUN_HOME
  rabbitmqctl ARGS   run rabbitmqctl against this instance (right node, cookie, epmd)
  rabbitmq-diagnostics ARGS   likewise for rabbitmq-diagnostics
  psql ARGS          run psql on \$LONGRUN_DATABASE_URL
  -h, --help         this help

Usage from other scripts:   eval "\$($PROG up)"

Environment (defaults in brackets):
  LONGRUN_HOME                 state directory [$REPO_DIR/.longrun]
  LONGRUN_DEV_PG_PORT          PostgreSQL port [55432]
  LONGRUN_DEV_AMQP_PORT        AMQP port P [55672]
  LONGRUN_DEV_AMQP_MGMT_PORT   management HTTP port [P+100]
  LONGRUN_DEV_EPMD_PORT        private epmd port [P+200]
  LONGRUN_DEV_AMQP_DIST_PORT   Erlang distribution port [P+300]
  LONGRUN_RABBITMQ_START_TIMEOUT  seconds to wait for RabbitMQ [180]
  LONGRUN_PG_START_TIMEOUT        seconds to wait for PostgreSQL [90]
Ports not given explicitly are taken from LONGRUN_HOME/ports.env (written by
the last start) before falling back to the defaults.

URLs printed:
  export LONGRUN_DATABASE_URL=postgresql://longrun@127.0.0.1:<pg>/longrun
  export LONGRUN_AMQP_URL=amqp://longrun:longrun@127.0.0.1:<amqp>/
  export LONGRUN_AMQP_MGMT_URL=http://longrun:longrun@127.0.0.1:<mgmt>/
EOF
}

# ---------------------------------------------------------------------------
# Layout and ports

resolve_home() {
  local h=${LONGRUN_HOME:-$REPO_DIR/.longrun}
  [[ $h == /* ]] || h=$PWD/$h
  # Paths end up unquoted in pg_ctl -o and Erlang/rabbit env files: keep them simple.
  [[ $h =~ ^/[A-Za-z0-9._/+@=-]*$ ]] ||
    die "LONGRUN_HOME must be a path without spaces or special characters: '$h'"
  h=${h%/}
  [[ -n $h ]] || die "LONGRUN_HOME must not be /"
  LH=$h
  PG_DIR=$LH/postgres
  PGDATA_DIR=$PG_DIR/data
  PG_SOCK=$PG_DIR/sock
  PG_LOG=$PG_DIR/log/postgres.log
  RMQ_DIR=$LH/rabbitmq
  RMQ_HOMEDIR=$RMQ_DIR/home
  RMQ_PIDFILE=$RMQ_DIR/rabbitmq.pid
  RMQ_OUT=$RMQ_DIR/server.out
  STATE_FILE=$LH/ports.env
}

# read KEY=VALUE (digits / node names only) from ports.env into REC_<KEY>
load_state() {
  REC_PG_PORT='' REC_AMQP_PORT='' REC_MGMT_PORT='' REC_EPMD_PORT='' REC_DIST_PORT=''
  [[ -f $STATE_FILE ]] || return 0
  local k v
  while IFS='=' read -r k v; do
    [[ $v =~ ^[0-9]+$ ]] || continue
    case $k in
      PG_PORT|AMQP_PORT|MGMT_PORT|EPMD_PORT|DIST_PORT) printf -v "REC_$k" '%s' "$v" ;;
    esac
  done <"$STATE_FILE"
}

# update some keys of ports.env, keeping the others
save_state() {
  local -A kv=()
  local k v
  if [[ -f $STATE_FILE ]]; then
    while IFS='=' read -r k v; do [[ $k =~ ^[A-Z_]+$ ]] && kv[$k]=$v; done <"$STATE_FILE"
  fi
  for k in "$@"; do kv[${k%%=*}]=${k#*=}; done
  {
    echo "# written by scripts/services.sh; explicit LONGRUN_DEV_*_PORT env vars win"
    for k in PG_PORT AMQP_PORT MGMT_PORT EPMD_PORT DIST_PORT; do
      [[ -n ${kv[$k]:-} ]] && echo "$k=${kv[$k]}"
    done
  } >"$STATE_FILE.tmp"
  mv -f "$STATE_FILE.tmp" "$STATE_FILE"
}

check_port() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || (( $2 < 1024 || $2 > 65535 )); then
    die "$1 port must be an integer in 1024..65535 (got '$2')"
  fi
}

resolve_ports() {
  load_state
  PG_PORT=${LONGRUN_DEV_PG_PORT:-${REC_PG_PORT:-55432}}
  if [[ -n ${LONGRUN_DEV_AMQP_PORT:-} && ${LONGRUN_DEV_AMQP_PORT} != "$REC_AMQP_PORT" ]]; then
    # a different AMQP port was asked for: derive the rest from it, not from the record
    REC_MGMT_PORT='' REC_EPMD_PORT='' REC_DIST_PORT=''
  fi
  AMQP_PORT=${LONGRUN_DEV_AMQP_PORT:-${REC_AMQP_PORT:-55672}}
  check_port AMQP "$AMQP_PORT"
  MGMT_PORT=${LONGRUN_DEV_AMQP_MGMT_PORT:-${REC_MGMT_PORT:-$((AMQP_PORT + 100))}}
  EPMD_PORT=${LONGRUN_DEV_EPMD_PORT:-${REC_EPMD_PORT:-$((AMQP_PORT + 200))}}
  DIST_PORT=${LONGRUN_DEV_AMQP_DIST_PORT:-${REC_DIST_PORT:-$((AMQP_PORT + 300))}}
  check_port PostgreSQL "$PG_PORT"
  check_port management "$MGMT_PORT"
  check_port epmd "$EPMD_PORT"
  check_port distribution "$DIST_PORT"
  local -A seen=()
  local p
  for p in "$PG_PORT" "$AMQP_PORT" "$MGMT_PORT" "$EPMD_PORT" "$DIST_PORT"; do
    [[ -z ${seen[$p]:-} ]] || die "port $p is used twice (pg=$PG_PORT amqp=$AMQP_PORT mgmt=$MGMT_PORT epmd=$EPMD_PORT dist=$DIST_PORT)"
    seen[$p]=1
  done
  NODE=longrun$AMQP_PORT@localhost
}

urls() {
  DATABASE_URL=postgresql://longrun@127.0.0.1:$PG_PORT/longrun
  AMQP_URL=amqp://longrun:longrun@127.0.0.1:$AMQP_PORT/
  MGMT_URL=http://longrun:longrun@127.0.0.1:$MGMT_PORT/
}

print_env() {
  urls
  out "export LONGRUN_DATABASE_URL=$DATABASE_URL"
  out "export LONGRUN_AMQP_URL=$AMQP_URL"
  out "export LONGRUN_AMQP_MGMT_URL=$MGMT_URL"
}

take_lock() {
  mkdir -p "$LH"
  exec 9>"$LH/.lock"
  if ! flock -n 9; then
    say "waiting for another $PROG on $LH ..."
    flock -w 600 9 || die "could not lock $LH/.lock"
  fi
}

# true if something accepts TCP connections on 127.0.0.1:$1
port_open() { (exec 8<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Our ports lie inside Linux's ephemeral range (32768-60999), so an outgoing
# connection of any program may take one as its local port, and the Erlang
# distribution listener refuses to start while such a socket (even in
# TIME-WAIT) holds it.  As root, take them out of the ephemeral range
# (net.ipv4.ip_local_reserved_ports, added to what is there).  Returns 0 when
# they were reserved already (nothing can hold them), else 1: then the caller
# waits (up to 70 s: TIME-WAIT lasts 60 s) until no socket uses them.
reserve_ports() {
  local f=/proc/sys/net/ipv4/ip_local_reserved_ports cur want p
  cur=$(cat "$f" 2>/dev/null) || return 1
  want=$cur
  for p in "$@"; do
    [[ ,$want, == *",$p,"* ]] || want=${want:+$want,}$p
  done
  [[ $want != "$cur" ]] || return 0
  [[ -w $f ]] && { echo "$want" >"$f"; } 2>/dev/null
  return 1
}

wait_ports_free() {
  command -v ss >/dev/null || return 0
  local p t0=$SECONDS said=0
  for p in "$@"; do
    while [[ -n $(ss -Htan "( sport = :$p )" 2>/dev/null) ]]; do
      if (( said == 0 )); then
        say "port $p is held by a closing connection; waiting for it to be released (at most 70 s)"
        said=1
      fi
      (( $(elapsed $t0) < 70 )) || die "port $p is still in use (ss -tan 'sport = :$p'); set LONGRUN_DEV_AMQP_PORT"
      sleep 1
    done
  done
}

elapsed() { echo $((SECONDS - $1)); }

# ---------------------------------------------------------------------------
# deps

cmd_deps() {
  deps_debian
  deps_node
}

deps_sudo=()
deps_updated=0 # 1 once deps_debian ran apt-get update
deps_as_root() {
  if [[ $EUID -ne 0 && ${#deps_sudo[@]} -eq 0 ]]; then
    command -v sudo >/dev/null || die "not root and sudo is not installed"
    deps_sudo=(sudo)
  fi
  "${deps_sudo[@]}" env DEBIAN_FRONTEND=noninteractive "$@"
}

deps_debian() {
  local -A have=()
  local name st
  while read -r name st; do
    [[ $st == ii* ]] && have[$name]=1
  done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${DEPS_PACKAGES[@]}" 2>/dev/null || true)
  local missing=() p
  for p in "${DEPS_PACKAGES[@]}"; do [[ -n ${have[${p%%:*}]:-} ]] || missing+=("$p"); done
  if (( ${#missing[@]} == 0 )); then
    say "deps: all ${#DEPS_PACKAGES[@]} packages already installed"
    return 0
  fi
  say "deps: missing: ${missing[*]}"
  deps_as_root apt-get update
  deps_as_root apt-get install -y --no-install-recommends "${DEPS_PACKAGES[@]}"
  deps_updated=1
  say "deps: installed"
}

# The npm packages of DIR (relative to the repository) exactly as its package-lock.json pins
# them (npm ci), unless node_modules already matches the lock file.
deps_npm_ci() {
  local dir="$REPO_DIR/$1"
  [[ -f $dir/package-lock.json ]] || return 0
  if [[ -f $dir/node_modules/.package-lock.json && ! $dir/package-lock.json -nt $dir/node_modules/.package-lock.json ]]; then
    say "deps: $1: node_modules matches package-lock.json"
    return 0
  fi
  say "deps: npm ci in $1"
  (cd "$dir" && npm ci --no-audit --no-fund) || die "npm ci in $dir failed"
}

# Node.js and npm: the machine's own when it has them (an image may ship NodeSource's nodejs,
# which bundles npm and conflicts with Debian's npm package), else Debian's nodejs and npm.
# Then the packages of examples/producers/node and of the MCP reference server
# (tests/mcp-everything, for tests/integration/test_mcp.py).
deps_node() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "deps: node or npm not found: installing Debian's nodejs and npm"
    [[ $deps_updated -eq 1 ]] || deps_as_root apt-get update
    deps_as_root apt-get install -y --no-install-recommends nodejs npm
  fi
  deps_npm_ci examples/producers/node
  deps_npm_ci tests/mcp-everything
}

# ---------------------------------------------------------------------------
# PostgreSQL

find_pg_bin() {
  if [[ -n ${LONGRUN_PG_BINDIR:-} ]]; then PG_BIN=$LONGRUN_PG_BINDIR; return; fi
  PG_BIN=
  local d
  while read -r d; do
    [[ -x $d/initdb ]] && PG_BIN=$d
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4,4n)
  [[ -n $PG_BIN ]] || PG_BIN=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")
  [[ -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl ]] ||
    die "PostgreSQL server binaries not found (run '$PROG deps', or set LONGRUN_PG_BINDIR)"
}

# run a command as the PostgreSQL server owner (postgres when we are root)
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

pg_running() {
  [[ -f $PGDATA_DIR/postmaster.pid ]] || return 1
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1
}

# port of the running postmaster (line 4 of postmaster.pid)
pg_running_port() { sed -n 4p "$PGDATA_DIR/postmaster.pid" 2>/dev/null || true; }

pg_prepare_dirs() {
  mkdir -p "$PG_DIR" "$PG_SOCK" "${PG_LOG%/*}"
  if [[ $EUID -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "system user 'postgres' missing (install the postgresql package: $PROG deps)"
    chown postgres:postgres "$PG_DIR" "$PG_SOCK" "${PG_LOG%/*}"
    [[ ! -d $PGDATA_DIR ]] || chown postgres:postgres "$PGDATA_DIR"
    chmod 0755 "$PG_DIR" "$PG_SOCK"
    # postgres must be able to traverse every parent directory
    if ! as_pg test -w "$PG_DIR"; then
      local d=${PG_DIR%/*}
      while [[ -n $d ]]; do
        if [[ $(stat -c %A "$d") != ?????????[xt] ]]; then
          say "chmod o+x $d (so the postgres user can reach $PG_DIR)"
          chmod o+x "$d"
        fi
        d=${d%/*}
      done
      as_pg test -w "$PG_DIR" || die "user postgres cannot write $PG_DIR"
    fi
  fi
  # unix socket paths are limited to 107 bytes
  local s="$PG_SOCK/.s.PGSQL.$PG_PORT"
  (( ${#s} < 108 )) || die "socket path too long (${#s} > 107 bytes): $s — use a shorter LONGRUN_HOME"
}

pg_init() {
  local locale_args=(--no-locale)
  if locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$'; then locale_args=(--locale=C.UTF-8); fi
  say "postgres: initdb $PGDATA_DIR"
  as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" --username=postgres --auth=trust \
    --encoding=UTF8 "${locale_args[@]}" >"$PG_DIR/initdb.log" 2>&1 || {
    cat "$PG_DIR/initdb.log"; die "initdb failed"; }
  # Dev/test tuning.  listen_addresses/port/socket dir are given on the
  # command line at every start (see pg_start) so port changes just work.
  as_pg tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<'EOF'

# ---- longrun dev/test instance (scripts/services.sh) ----
max_connections = 300
shared_buffers = 256MB
fsync = on                      # durability is the product: keep it on
synchronous_commit = on
full_page_writes = on
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
log_connections = off
log_disconnections = off
EOF
}

psql_admin() {
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}

pg_ensure_role_db() {
  if [[ $(psql_admin -tAc "select 1 from pg_roles where rolname = 'longrun'") != 1 ]]; then
    say "postgres: creating role longrun"
    psql_admin -c "create role longrun login createdb"
  fi
  if [[ $(psql_admin -tAc "select 1 from pg_database where datname = 'longrun'") != 1 ]]; then
    say "postgres: creating database longrun"
    psql_admin -c "create database longrun owner longrun encoding 'UTF8' template template0"
  fi
}

pg_start() {
  find_pg_bin
  if pg_running; then
    local rp; rp=$(pg_running_port)
    [[ $rp == "$PG_PORT" ]] ||
      die "PostgreSQL of $LH is already running on port $rp, not $PG_PORT: run '$PROG stop-postgres' first"
    say "postgres: already running on 127.0.0.1:$PG_PORT"
    pg_ensure_role_db
    return 0
  fi
  local t0=$SECONDS
  pg_prepare_dirs
  [[ -f $PGDATA_DIR/PG_VERSION ]] || pg_init
  if port_open "$PG_PORT"; then
    die "port $PG_PORT is already in use by another process (set LONGRUN_DEV_PG_PORT)"
  fi
  save_state "PG_PORT=$PG_PORT"
  say "postgres: starting on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -w -t "${LONGRUN_PG_START_TIMEOUT:-90}" \
      -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$PG_SOCK" \
      start </dev/null >/dev/null 3>&- 9>&-; then
    tail -n 30 "$PG_LOG" 2>/dev/null || true
    die "PostgreSQL failed to start (see $PG_LOG)"
  fi
  pg_ensure_role_db
  say "postgres: up in $(elapsed $t0)s"
}

pg_stop() {
  local mode=${1:-fast}
  find_pg_bin
  if ! pg_running; then
    say "postgres: not running"
    return 0
  fi
  say "postgres: stopping (-m $mode)"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m "$mode" -w -t 120 stop >/dev/null </dev/null 3>&- 9>&-
  say "postgres: stopped"
}

# ---------------------------------------------------------------------------
# RabbitMQ

RMQ_SBIN=${LONGRUN_RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}

rmq_check_installed() {
  [[ -x $RMQ_SBIN/rabbitmq-server && -x $RMQ_SBIN/rabbitmqctl ]] ||
    die "RabbitMQ not found in $RMQ_SBIN (run '$PROG deps', or set LONGRUN_RABBITMQ_SBIN)"
}

# Environment shared by the server and our CLI calls (used in subshells only).
rmq_env() {
  # drop anything a caller or /etc/rabbitmq/rabbitmq-env.conf might inject
  local v
  for v in $(compgen -e | grep -E '^(RABBITMQ_|ERL_)' || true); do unset "$v"; done
  export HOME=$RMQ_HOMEDIR
  export RABBITMQ_CONF_ENV_FILE=$RMQ_DIR/rabbitmq-env.conf
  export RABBITMQ_NODENAME=$NODE
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$AMQP_PORT
  export RABBITMQ_DIST_PORT=$DIST_PORT
  export RABBITMQ_MNESIA_BASE=$RMQ_DIR/mnesia
  export RABBITMQ_LOG_BASE=$RMQ_DIR/log
  export RABBITMQ_CONFIG_FILE=$RMQ_DIR/rabbitmq.conf
  export RABBITMQ_ADVANCED_CONFIG_FILE=$RMQ_DIR/advanced.config
  export RABBITMQ_ENABLED_PLUGINS_FILE=$RMQ_DIR/enabled_plugins
  export RABBITMQ_PID_FILE=$RMQ_PIDFILE
  # the Erlang distribution listener on loopback only
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export ERL_EPMD_PORT=$EPMD_PORT
  export ERL_EPMD_ADDRESS=127.0.0.1
}

# rabbitmqctl / rabbitmq-diagnostics against our node
rmq_cli() {
  local tool=$1; shift
  ( rmq_env; cd "$RMQ_DIR" && exec "$RMQ_SBIN/$tool" -n "$NODE" "$@" 3>&- 9>&- )
}

# pid of the running Erlang VM, or fail
rmq_pid() {
  local pid
  pid=$(cat "$RMQ_PIDFILE" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$RMQ_DIR" || return 1
  echo "$pid"
}

rmq_write_config() {
  mkdir -p "$RMQ_HOMEDIR" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
  chmod 0700 "$RMQ_HOMEDIR"
  if [[ ! -s $RMQ_HOMEDIR/.erlang.cookie ]]; then
    # private cookie for this instance (the CLI reads it from the same $HOME)
    local cookie
    cookie=$(set +o pipefail; LC_ALL=C tr -dc '[:upper:]' </dev/urandom | head -c 32)
    (( ${#cookie} == 32 )) || die "could not generate an Erlang cookie"
    (umask 077; printf '%s' "$cookie" >"$RMQ_HOMEDIR/.erlang.cookie")
    chmod 0400 "$RMQ_HOMEDIR/.erlang.cookie"
  fi
  : >"$RMQ_DIR/rabbitmq-env.conf"
  echo '[rabbitmq_management].' >"$RMQ_DIR/enabled_plugins"
  cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# generated by scripts/services.sh on every start: edits are overwritten
# AMQP listener: RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
loopback_users.guest = true
log.file.level = info
log.console = false
# consumer_timeout: RabbitMQ default (30 min)
EOF
}

rmq_ensure_user() {
  # fast path: the management API already accepts longrun:longrun
  if command -v curl >/dev/null &&
     [[ $(curl -s -o /dev/null -w '%{http_code}' -u longrun:longrun "http://127.0.0.1:$MGMT_PORT/api/whoami" 2>/dev/null) == 200 ]]; then
    return 0
  fi
  say "rabbitmq: creating user longrun (administrator, full permissions on /)"
  if ! rmq_cli rabbitmqctl -q list_users 2>/dev/null | awk '{print $1}' | grep -qx longrun; then
    rmq_cli rabbitmqctl -q add_user longrun longrun >/dev/null
  fi
  rmq_cli rabbitmqctl -q set_user_tags longrun administrator >/dev/null
  rmq_cli rabbitmqctl -q set_permissions -p / longrun '.*' '.*' '.*' >/dev/null
}

rmq_show_logs() {
  say "---- tail of $RMQ_OUT ----"
  tail -n 20 "$RMQ_OUT" 2>/dev/null || true
  local f
  for f in "$RMQ_DIR"/log/*.log; do
    [[ -f $f ]] || continue
    say "---- tail of $f ----"
    tail -n 30 "$f"
  done
}

rmq_start() {
  rmq_check_installed
  local pid
  if pid=$(rmq_pid); then
    [[ ${REC_AMQP_PORT:-$AMQP_PORT} == "$AMQP_PORT" ]] ||
      die "RabbitMQ of $LH is already running on AMQP port $REC_AMQP_PORT, not $AMQP_PORT: run '$PROG stop-rabbitmq' first"
    say "rabbitmq: already running (node $NODE, pid $pid)"
    rmq_cli rabbitmqctl -q await_startup --timeout 120 >/dev/null || die "rabbitmq: node is not responding"
    rmq_ensure_user
    return 0
  fi
  local t0=$SECONDS p
  for p in "$AMQP_PORT" "$MGMT_PORT" "$DIST_PORT"; do
    ! port_open "$p" || die "port $p is already in use by another process (set LONGRUN_DEV_AMQP_PORT)"
  done
  reserve_ports "$PG_PORT" "$AMQP_PORT" "$MGMT_PORT" "$EPMD_PORT" "$DIST_PORT" ||
    wait_ports_free "$AMQP_PORT" "$MGMT_PORT" "$DIST_PORT"
  rmq_write_config
  save_state "AMQP_PORT=$AMQP_PORT" "MGMT_PORT=$MGMT_PORT" "EPMD_PORT=$EPMD_PORT" "DIST_PORT=$DIST_PORT"
  rm -f "$RMQ_PIDFILE"
  say "rabbitmq: starting node $NODE (amqp $AMQP_PORT, mgmt $MGMT_PORT, epmd $EPMD_PORT, dist $DIST_PORT; log: $RMQ_OUT)"
  {
    echo "==== $(date -u '+%F %T') UTC: $PROG starting $NODE"
  } >>"$RMQ_OUT"
  (
    rmq_env
    cd "$RMQ_DIR"
    exec setsid nohup "$RMQ_SBIN/rabbitmq-server" </dev/null >>"$RMQ_OUT" 2>&1 3>&- 9>&-
  ) &
  local wrapper=$! timeout=${LONGRUN_RABBITMQ_START_TIMEOUT:-180} next=5
  # 1) wait for the VM to write its pid file (cheap polling, no CLI calls yet)
  until pid=$(rmq_pid); do
    if ! kill -0 "$wrapper" 2>/dev/null; then
      rmq_show_logs; die "rabbitmq-server exited during startup"
    fi
    (( $(elapsed $t0) < timeout )) || { rmq_show_logs; die "rabbitmq: no pid file after ${timeout}s"; }
    sleep 0.2
  done
  # 2) wait for the broker to boot, printing progress
  say "rabbitmq: VM started (pid $pid), waiting for the broker to boot (usually 5-15 s)..."
  until rmq_cli rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rmq_show_logs; die "rabbitmq: the node died during startup"
    fi
    (( $(elapsed $t0) < timeout )) || { rmq_show_logs; die "rabbitmq: not up after ${timeout}s"; }
    if (( $(elapsed $t0) >= next )); then
      say "rabbitmq: still booting ($(elapsed $t0)s)..."
      next=$(( $(elapsed $t0) + 5 ))
    fi
    sleep 1
  done
  rmq_ensure_user
  say "rabbitmq: up in $(elapsed $t0)s"
}

rmq_kill_epmd() {
  command -v epmd >/dev/null || return 0
  # only if this LONGRUN_HOME ever started a node (ports.env records its epmd port)
  [[ -n $REC_EPMD_PORT ]] || return 0
  # only our private epmd, and only once no node is registered with it
  if ERL_EPMD_PORT=$EPMD_PORT epmd -names 2>/dev/null | grep -q '^name '; then
    return 0
  fi
  ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true
}

rmq_stop() {
  rmq_check_installed
  local pid
  if ! pid=$(rmq_pid); then
    say "rabbitmq: not running"
    rm -f "$RMQ_PIDFILE"
    rmq_kill_epmd
    return 0
  fi
  say "rabbitmq: stopping node $NODE (pid $pid)"
  if ! rmq_cli rabbitmqctl -q -t 120 stop "$RMQ_PIDFILE" >/dev/null 2>&1; then
    warn "rabbitmqctl stop failed; sending SIGTERM to $pid"
    kill -TERM "$pid" 2>/dev/null || true
  fi
  local i
  for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    warn "rabbitmq: still alive after 30s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RMQ_PIDFILE"
  rmq_kill_epmd
  say "rabbitmq: stopped"
}

rmq_kill() {
  local pid
  if ! pid=$(rmq_pid); then say "rabbitmq: not running"; return 0; fi
  say "rabbitmq: SIGKILL node $NODE (pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$RMQ_PIDFILE"
}

# For stop/status: address the RabbitMQ instance that was actually started
# (ports.env), even if the env asks for other ports now.
use_recorded_rmq_ports() {
  if [[ -n $REC_AMQP_PORT ]]; then
    AMQP_PORT=$REC_AMQP_PORT
    MGMT_PORT=${REC_MGMT_PORT:-$((AMQP_PORT + 100))}
    EPMD_PORT=${REC_EPMD_PORT:-$((AMQP_PORT + 200))}
    DIST_PORT=${REC_DIST_PORT:-$((AMQP_PORT + 300))}
    NODE=longrun$AMQP_PORT@localhost
  fi
}

# ---------------------------------------------------------------------------
# commands

cmd_up() {
  take_lock
  local t0=$SECONDS
  pg_start
  rmq_start
  say "all services up ($(elapsed $t0)s); LONGRUN_HOME=$LH"
  print_env
}

cmd_down() {
  [[ -d $LH ]] || { say "nothing to stop: $LH does not exist"; return 0; }
  take_lock
  use_recorded_rmq_ports
  rmq_stop
  pg_stop fast
}

cmd_status() {
  local rc=0 pid
  find_pg_bin
  urls
  if pg_running && [[ -n $(pg_running_port) ]]; then
    local rp; rp=$(pg_running_port)
    PG_PORT=$rp; urls
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$rp" -U postgres -d postgres -t 5; then
      out "postgres: running  (pid $(head -1 "$PGDATA_DIR/postmaster.pid"), 127.0.0.1:$rp)  $DATABASE_URL"
    else
      out "postgres: started but not accepting connections  (127.0.0.1:$rp)"; rc=1
    fi
  else
    out "postgres: stopped  (data: $PGDATA_DIR)"; rc=1
  fi
  use_recorded_rmq_ports
  urls
  if [[ -x $RMQ_SBIN/rabbitmqctl ]] && pid=$(rmq_pid); then
    if rmq_cli rabbitmq-diagnostics -q ping --timeout 10 >/dev/null 2>&1; then
      out "rabbitmq: running  (pid $pid, node $NODE)  $AMQP_URL  mgmt $MGMT_URL"
    else
      out "rabbitmq: process $pid alive but node $NODE not answering (booting or stuck)"; rc=1
    fi
  else
    out "rabbitmq: stopped  (node $NODE)"; rc=1
  fi
  out "LONGRUN_HOME=$LH"
  return $rc
}

cmd_reset() {
  if [[ ! -e $LH ]]; then say "nothing to reset: $LH does not exist"; return 0; fi
  [[ -d $LH ]] || die "$LH is not a directory"
  # refuse to wipe something that is not a longrun home
  local f
  for f in "$LH"/* "$LH"/.[!.]*; do
    [[ -e $f ]] || continue
    case ${f##*/} in
      postgres|rabbitmq|ports.env|ports.env.tmp|.lock) ;;
      *) die "refusing to delete $LH: it contains '${f##*/}', which $PROG did not create" ;;
    esac
  done
  cmd_down
  exec 9>&-
  say "deleting $LH"
  rm -rf -- "$LH"
}

main() {
  local cmd=${1:-}
  [[ $# -gt 0 ]] && shift
  case $cmd in
    -h|--help|help) usage; return 0 ;;
    deps) cmd_deps; return ;;
    '') usage; return 2 ;;
  esac
  resolve_home
  resolve_ports
  case $cmd in
    up)               cmd_up ;;
    env)              print_env ;;
    down|stop)        cmd_down ;;
    status)           cmd_status ;;
    reset)            cmd_reset ;;
    start-postgres)   take_lock; pg_start; print_env ;;
    stop-postgres)    take_lock; pg_stop fast ;;
    restart-postgres) take_lock; pg_stop fast; pg_start; print_env ;;
    kill-postgres)    take_lock; pg_stop immediate ;;
    start-rabbitmq)   take_lock; rmq_start; print_env ;;
    stop-rabbitmq)    take_lock; use_recorded_rmq_ports; rmq_stop ;;
    restart-rabbitmq) take_lock; use_recorded_rmq_ports; rmq_stop; resolve_ports; rmq_start; print_env ;;
    kill-rabbitmq)    take_lock; use_recorded_rmq_ports; rmq_kill ;;
    rabbitmqctl|rabbitmq-diagnostics)
      rmq_check_installed; use_recorded_rmq_ports
      rmq_cli "$cmd" "$@" >&3 ;;
    psql)
      find_pg_bin; urls
      "$PG_BIN/psql" "$DATABASE_URL" "$@" >&3 ;;
    *)
      printf '%s: unknown command: %s (see %s --help)\n' "$PROG" "$cmd" "$PROG"
      return 2 ;;
  esac
}

main "$@"
