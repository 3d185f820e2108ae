#!/usr/bin/env bash
# Property-based run of the OpenAPI description against a live Ledger service.
#
# Needs LEDGER_BIN (the built `ledger` executable) and LEDGER_TEST_PG (an admin libpq conninfo without dbname, e.g.
# `host=127.0.0.1 port=55500 user=postgres`). Creates a fresh database, migrates it, makes a token, creates a few
# accounts the schema's examples name, starts `ledger serve` on a free port of 127.0.0.1, and runs schemathesis with
# every check. Exits non-zero on any server error, schema violation or other check failure.
#
# Tunables (environment):
#   ST_MAX_EXAMPLES  test cases per operation and phase (default 150: well under 3 minutes on 2 cores)
#   ST_SEED          hypothesis seed, to reproduce a run (random when unset; the run prints its seed)
#   ST_WORKERS       concurrent workers (default 1: several can trip a CPython 3.11 AST thread-safety bug in hypothesis)
#   ST_REPORT_DIR    keep the JUnit report, the accepted-rejection log and the server log there
#   LEDGER_TEST_KEEP_DB=1  do not drop the database afterwards
# The schemathesis CLI is the 4.x series (`schemathesis run <schema> --url <base> ...`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${LEDGER_BIN:?set LEDGER_BIN to the built ledger executable}"
: "${LEDGER_TEST_PG:?set LEDGER_TEST_PG to an admin libpq conninfo without dbname}"
[ -x "$LEDGER_BIN" ] || { echo "LEDGER_BIN $LEDGER_BIN is not executable" >&2; exit 2; }
command -v schemathesis >/dev/null 2>&1 || python3 -m pip install -q schemathesis
command -v psql >/dev/null 2>&1 || { echo "psql is needed" >&2; exit 2; }

max_examples="${ST_MAX_EXAMPLES:-150}"
workers="${ST_WORKERS:-1}"
work="$(mktemp -d /tmp/ledger-openapi.XXXXXX)"
db="ledger_openapi_$(date +%s)_$$"
server_pid=""

cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ -n "${ST_REPORT_DIR:-}" ]; then
    mkdir -p "$ST_REPORT_DIR"
    cp -r "$work/report/." "$ST_REPORT_DIR/" 2>/dev/null || true
    cp "$work/serve.log" "$ST_REPORT_DIR/serve.log" 2>/dev/null || true
  elif [ "$rc" -ne 0 ] && [ -f "$work/serve.log" ]; then
    echo "--- last lines of the server log ($work/serve.log) ---" >&2
    tail -n 15 "$work/serve.log" >&2 || true
  fi
  if [ -z "${LEDGER_TEST_KEEP_DB:-}" ]; then
    psql -X -q "$LEDGER_TEST_PG dbname=postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  [ "$rc" -ne 0 ] || rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

psql -X -q -v ON_ERROR_STOP=1 "$LEDGER_TEST_PG dbname=postgres" -c "CREATE DATABASE $db"
# The same database as a libpq conninfo string: DATABASE_URL accepts either form.
export DATABASE_URL="$LEDGER_TEST_PG dbname=$db"
"$LEDGER_BIN" migrate >/dev/null
token="$("$LEDGER_BIN" token create st | tail -n 1)"
[ -n "$token" ] || { echo "ledger token create printed no token" >&2; exit 1; }

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
base="http://127.0.0.1:$port"
LOG_FORMAT=text LOG_LEVEL=info "$LEDGER_BIN" serve --hostname 127.0.0.1 --port "$port" --no-migrate \
  >"$work/serve.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 300); do
  if curl -fsS -o /dev/null "$base/health" 2>/dev/null; then break; fi
  kill -0 "$server_pid" 2>/dev/null || { echo "ledger serve exited; log:" >&2; cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS -o /dev/null "$base/health"

# The accounts the schema's examples name (alice, bob in USD), plus a second currency and an overdraft account, so
# that examples and generated requests reach the success paths too, not only 404 account-not-found.
put_account() {
  local status
  status="$(curl -sS -o /dev/null -w '%{http_code}' -X PUT "$base/v1/accounts/$1" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d "$2")"
  [ "$status" = 201 ] || { echo "PUT /v1/accounts/$1 answered $status" >&2; exit 1; }
}
put_account alice '{"currency":"USD"}'
put_account bob '{"currency":"USD"}'
put_account carol '{"currency":"EUR"}'
put_account overdraft '{"currency":"USD","allow_negative":true}'
credit_status="$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$base/v1/credits" \
  -H "Authorization: Bearer $token" -H 'Idempotency-Key: seed-alice' -H 'Content-Type: application/json' \
  -d '{"account":"alice","amount":100000,"currency":"USD"}')"
[ "$credit_status" = 201 ] || { echo "seed credit answered $credit_status" >&2; exit 1; }

# The served description must be this repository's file, byte for byte (a stale build would test another one).
# schemathesis then loads the served copy from a file: loaded from its own URL, it leaves GET /openapi.yaml untested.
curl -fsS -o "$work/openapi.yaml" "$base/openapi.yaml"
if ! cmp -s "$work/openapi.yaml" "$here/../../Sources/LedgerHTTP/Resources/openapi.yaml"; then
  echo "GET /openapi.yaml differs from Sources/LedgerHTTP/Resources/openapi.yaml: rebuild with swift build" >&2
  exit 1
fi

seed_args=()
[ -n "${ST_SEED:-}" ] && seed_args=(--seed "$ST_SEED")

# Run from the work directory: schemathesis keeps its example database and caches in the current directory.
cd "$work"
# Every check runs, none is excluded. The one hook (schemathesis_hooks.py) only drops a positive-data rejection whose
# problem code is exactly the documented answer to a rule JSON Schema cannot express (from != to, no whole floats as
# amounts, metadata byte size, server-issued cursors, 422 ledger-state outcomes); see that file.
: >"$work/filtered.log"
st_rc=0
# Response times up to 35 s: GET /v1/events with wait_s (up to 30) waits for an event by design.
SCHEMATHESIS_HOOKS="$here/schemathesis_hooks.py" ST_FILTER_LOG="$work/filtered.log" \
  schemathesis run "$work/openapi.yaml" \
  --url "$base" \
  -H "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$max_examples" \
  --workers "$workers" \
  --request-timeout 40 \
  --max-response-time 35 \
  --generation-database none \
  --report junit --report-dir "$work/report" \
  --no-color \
  "${seed_args[@]}" || st_rc=$?

echo
echo "Positive-data rejections accepted as documented answers (method, path, status, code):"
if [ -s "$work/filtered.log" ]; then sort "$work/filtered.log" | uniq -c | sort -rn; else echo "  none"; fi
cp "$work/filtered.log" "$work/report/filtered.log" 2>/dev/null || true

# Belt and braces: the service must not have answered any request with a 5xx (its log has one line per request).
server_errors="$(grep -c 'http.status=5[0-9][0-9]' "$work/serve.log" || true)"
echo "Responses with a 5xx status in the server log: $server_errors"
if [ "$server_errors" != 0 ]; then
  grep -E 'http.status=5[0-9][0-9]|error' "$work/serve.log" | head -n 20 >&2
  [ "$st_rc" -ne 0 ] || st_rc=1
fi
exit "$st_rc"
