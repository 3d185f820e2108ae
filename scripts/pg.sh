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

# Installs what building and testing need, if missing (Debian): the PostgreSQL server and libpq-dev.
# `ensure_debian_packages client` leaves out the server (tests against a PostgreSQL running elsewhere).
ensure_debian_packages() {
  local missing=()
  [ "${1:-}" = client ] || pg_bin_dir >/dev/null 2>&1 || missing+=(postgresql)
  pkg-config --exists libpq 2>/dev/null || missing+=(libpq-dev)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
  echo "installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Runs a PostgreSQL binary as the server's user.
pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# pg_start DATA_DIR PORT: initialises DATA_DIR if empty and starts a server listening on 127.0.0.1:PORT and on a
# socket in DATA_DIR/socket. fsync and synchronous_commit stay on: tests and benchmarks measure the real thing.
pg_start() {
  local data="$1" port="$2" bin
  bin=$(pg_bin_dir) || { echo "PostgreSQL server binaries not found" >&2; return 1; }
  mkdir -p "$data"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$data"; chmod 700 "$data"; fi
  if [ ! -f "$data/PG_VERSION" ]; then
    pg_as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  fi
  pg_as_owner mkdir -p "$data/socket"
  pg_as_owner "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
    -o "-p $port -k $data/socket -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB" >/dev/null
}

# pg_stop DATA_DIR [MODE]: stops the server (mode fast by default; immediate simulates a crash).
pg_stop() {
  local data="$1" mode="${2:-fast}" bin
  bin=$(pg_bin_dir) || return 0
  [ -f "$data/postmaster.pid" ] || return 0
  pg_as_owner "$bin/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null 2>&1 || true
}
