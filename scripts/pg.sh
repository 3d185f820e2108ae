# Shared helpers to run a private PostgreSQL for development and tests. Source this file; it defines functions only.
#
# PostgreSQL refuses to run as root, so when we are root the server runs as the `postgres` OS user, with its data,
# port and socket directory of our own: it never touches a system cluster.

pg_bin_dir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

# Debian's python3 for the helpers' one-liners, so that they never depend on a pyenv or virtualenv found on PATH.
system_python() {
  if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3; fi
}

# What building and testing need from Debian: the newest PostgreSQL 15 server and client, pgbouncer (scripts/test's
# pooler stage), libpq-dev, pkg-config, and
# python3 with venv (scripts/test keeps its Python packages in a virtual environment: Debian's python3 is externally
# managed). `ensure_debian_packages client` leaves out the server (tests against a PostgreSQL running elsewhere).
#
# As root it installs what is missing and upgrades what is older than Debian's candidate (security releases of
# PostgreSQL come as point releases), refreshing the package lists at most once an hour. Otherwise it prints the
# apt-get line to run.
ensure_debian_packages() {
  local wanted=(postgresql-client-15 libpq-dev pkg-config python3 python3-venv) todo=() pkg
  [ "${1:-}" = client ] || wanted=(postgresql-15 pgbouncer "${wanted[@]}")
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    # Not Debian: check for the tools themselves.
    local missing=()
    [ "${1:-}" = client ] || pg_bin_dir >/dev/null 2>&1 || missing+=("PostgreSQL server")
    [ "${1:-}" = client ] || command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
    command -v psql >/dev/null 2>&1 || missing+=(psql)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    pkg-config --exists libpq 2>/dev/null || missing+=("libpq headers")
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "missing: ${missing[*]}; install them with your system's package manager" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    for pkg in "${wanted[@]}"; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || todo+=("$pkg")
    done
    [ ${#todo[@]} -eq 0 ] && return 0
    echo "missing Debian packages: ${todo[*]}; install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${wanted[*]}" >&2
    return 1
  fi
  local stamp=/tmp/ledger-apt-update.stamp
  if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ]; then
    if apt-get update -qq >/dev/null; then touch "$stamp"; else echo "apt-get update failed; using the package lists as they are" >&2; fi
  fi
  # Missing (Installed: (none), or not known at all) or older than the candidate.
  mapfile -t todo < <(LC_ALL=C apt-cache policy "${wanted[@]}" 2>/dev/null | awk -v wanted="${wanted[*]}" '
    /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1); sub(/:[a-z0-9]+$/, "", pkg); seen[pkg] = 1 }
    /^  Installed:/ { installed[pkg] = $2 }
    /^  Candidate:/ { candidate[pkg] = $2 }
    END {
      n = split(wanted, names, " ")
      for (i = 1; i <= n; i++) {
        p = names[i]
        if (!(p in seen) || installed[p] == "(none)" || (candidate[p] != "(none)" && installed[p] != candidate[p])) print p
      }
    }')
  [ ${#todo[@]} -eq 0 ] && return 0
  echo "installing or upgrading Debian packages: ${todo[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${todo[@]}" >/dev/null
}

# A free TCP port on 127.0.0.1.
free_port() {
  "$(system_python)" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# port_free HOST PORT: whether a server could listen on HOST:PORT now (nothing else listens there).
port_free() {
  local python
  python=$(system_python) || return 0 # cannot tell: the server itself will say
  "$python" -c '
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(info[0], socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(info[4])
    s.close()
except OSError:
    sys.exit(1)
' "$1" "$2"
}

# Runs a PostgreSQL binary as the server's user.
pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# pg_start DATA_DIR PORT [OPTIONS]: initialises DATA_DIR if empty and starts a server listening on 127.0.0.1:PORT and
# on a socket in DATA_DIR/socket; OPTIONS are more `-c name=value` for the server. fsync and synchronous_commit stay
# on: tests and benchmarks measure the real thing.
pg_start() {
  local data="$1" port="$2" extra="${3:-}" bin
  bin=$(pg_bin_dir) || { echo "PostgreSQL server binaries not found" >&2; return 1; }
  mkdir -p "$data"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$data"; chmod 700 "$data"; fi
  if [ ! -f "$data/PG_VERSION" ]; then
    pg_as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  fi
  pg_as_owner mkdir -p "$data/socket"
  pg_as_owner "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
    -o "-p $port -k $data/socket -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB $extra" >/dev/null
}

# pg_stop DATA_DIR [MODE]: stops the server (mode fast by default; immediate simulates a crash).
pg_stop() {
  local data="$1" mode="${2:-fast}" bin
  bin=$(pg_bin_dir) || return 0
  [ -f "$data/postmaster.pid" ] || return 0
  pg_as_owner "$bin/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null 2>&1 || true
}

# pgbouncer_start DIR PORT PG_PORT: a pgbouncer in transaction pooling mode on 127.0.0.1:PORT in front of the
# server on 127.0.0.1:PG_PORT, any database (`*`), trust auth, its config, log and pid file in DIR. It runs as the
# server's user, like the server.
pgbouncer_start() {
  local dir="$1" port="$2" pg_port="$3" bin
  bin=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
  [ -x "$bin" ] || { echo "pgbouncer not found (Debian package pgbouncer)" >&2; return 1; }
  mkdir -p "$dir"
  echo '"postgres" ""' >"$dir/users.txt"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 40
reserve_pool_size = 10
server_reset_query =
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres:postgres "$dir"; fi
  pg_as_owner "$bin" -d -q "$dir/pgbouncer.ini" || return 1
  local i
  for i in $(seq 1 50); do
    port_free 127.0.0.1 "$port" || return 0
    sleep 0.1
  done
  echo "pgbouncer did not start listening on 127.0.0.1:$port; its log:" >&2
  cat "$dir/pgbouncer.log" >&2 2>/dev/null
  return 1
}

# pgbouncer_stop DIR: stops the pgbouncer of pgbouncer_start DIR, if it runs.
pgbouncer_stop() {
  local pidfile="$1/pgbouncer.pid" pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# citus_start DIR PORT WORKER_PORT...: a Citus cluster on this machine, each node a pg_start server with Citus
# preloaded (data in DIR/node-PORT): the coordinator on PORT, a worker on each WORKER_PORT. Databases that use Citus
# need `CREATE EXTENSION citus` on every node, then citus_add_db (below).
citus_start() {
  local dir="$1" port
  shift
  mkdir -p "$dir"
  for port in "$@"; do
    pg_start "$dir/node-$port" "$port" "-c shared_preload_libraries=citus -c max_prepared_transactions=100" || return 1
  done
}

# citus_stop DIR: stops every node citus_start DIR started.
citus_stop() {
  local node
  for node in "$1"/node-*; do [ -d "$node" ] && pg_stop "$node" fast; done
  return 0
}

# citus_add_db DBNAME PORT WORKER_PORT...: creates DBNAME on every node with the citus extension, and makes the node
# on PORT its coordinator with the others as workers.
citus_add_db() {
  local db="$1" coordinator="$2" port
  shift 2
  for port in "$coordinator" "$@"; do
    psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$db\"" || return 1
    psql -q -h 127.0.0.1 -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 -c "CREATE EXTENSION citus" || return 1
  done
  psql -q -h 127.0.0.1 -p "$coordinator" -U postgres -d "$db" -v ON_ERROR_STOP=1 -Atc \
    "SELECT citus_set_coordinator_host('127.0.0.1', $coordinator)" >/dev/null || return 1
  for port in "$@"; do
    psql -q -h 127.0.0.1 -p "$coordinator" -U postgres -d "$db" -v ON_ERROR_STOP=1 -Atc \
      "SELECT citus_add_node('127.0.0.1', $port)" >/dev/null || return 1
  done
}
