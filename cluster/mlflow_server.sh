#!/usr/bin/env bash
# The MLflow tracking server of a dvsa cluster: PostgreSQL (backend store: runs, params, metrics)
# + `mlflow server` with proxied artifacts (files go to $DVSA_SHARED/mlflow-artifacts through the
# server, so clients need no access to the shared volume). ray_cluster.yaml runs it on the head.
#
#   MLFLOW_HOST=10.0.1.23 bash cluster/mlflow_server.sh start    # prints the tracking URI
#   bash cluster/mlflow_server.sh status                          # and the URI it serves
#   bash cluster/mlflow_server.sh stop                           # mlflow, then PostgreSQL
#   bash cluster/mlflow_server.sh relay    # foreground: 127.0.0.1:$MLFLOW_PORT -> the server, for
#                                          # `ray exec ray_cluster.yaml --port-forward 5000 '...relay'`
#
# Environment:
#   MLFLOW_HOST           (start: required) the address to bind: the node's private IP. Never
#                         0.0.0.0 / :: (refused): the server has no login, so it must not answer
#                         on every interface; the cloud firewall admits the port from the
#                         cluster's own nodes only (ray_cluster.yaml, cluster/README.md).
#   DVSA_SHARED           shared volume (default /mnt/efs/dvsa)
#   MLFLOW_PORT           default 5000
#   MLFLOW_WORKERS        server worker processes (default 1)
#   MLFLOW_START_TIMEOUT  seconds to wait for GET /health = 200 (default 300; a cold start
#                         with the database migrations takes 10-100 s on a small machine)
#   MLFLOW_ARTIFACTS      artifact destination (default $DVSA_SHARED/mlflow-artifacts)
#   MLFLOW_SERVER_DIR     logs, pid files (default $DVSA_SHARED/mlflow-server)
#   MLFLOW_ALLOWED_HOSTS_EXTRA, MLFLOW_CORS_ORIGINS_EXTRA
#                         comma-separated additions to the Host / CORS allow lists (a DNS name
#                         the nodes use for the head, say)
#   MLFLOW_BACKEND_STORE_URI
#                         an existing database instead of the local PostgreSQL, e.g. RDS:
#                         postgresql+psycopg2://dvsa@mydb.xxxx.us-west-2.rds.amazonaws.com:5432/mlflow
#                         (no password in the URI: put it in ~/.pgpass or PGPASSWORD, which
#                         libpq reads). Then no PostgreSQL is started or stopped here.
#   PGDATA                PostgreSQL data dir (default $DVSA_SHARED/postgres; initdb once,
#                         reused afterwards)
#   PG_PORT               default 5432; PostgreSQL listens on 127.0.0.1 only
#   PG_SOCKET_DIR         its unix socket dir, local, 0700 (default /tmp/dvsa-pg.$PG_PORT)
#   PG_BIN                dir of initdb/pg_ctl/psql (default: PATH, else the newest
#                         /usr/lib/postgresql/*/bin, where Debian/Ubuntu's postgresql puts them)
#   MLFLOW_PG_TAKEOVER=1  PGDATA's lock names another machine (a head that was terminated without
#                         `stop`): declare that machine gone and start here. ray_cluster.yaml sets
#                         it, since `ray up` runs one head per cluster. Two PostgreSQL servers on
#                         one PGDATA would corrupt it, hence the refusal without it.
#   PYTHON                the Python with mlflow and psycopg2 (default python)
#   MLFLOW_RELAY_PORT     relay: the loopback port (default $MLFLOW_PORT)
#
# As root, PostgreSQL runs as the `postgres` user (it refuses root) and its dirs are chowned to
# it; otherwise everything runs as the calling user (`ray`, uid 1000, in the rayproject image).
# Only the processes this script started are ever signalled (pid files, checked against this
# machine's boot and the process's command line); nothing is killed by name.
set -euo pipefail

DVSA_SHARED=${DVSA_SHARED:-/mnt/efs/dvsa}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-1}
MLFLOW_START_TIMEOUT=${MLFLOW_START_TIMEOUT:-300}
MLFLOW_ARTIFACTS=${MLFLOW_ARTIFACTS:-$DVSA_SHARED/mlflow-artifacts}
MLFLOW_SERVER_DIR=${MLFLOW_SERVER_DIR:-$DVSA_SHARED/mlflow-server}
PGDATA=${PGDATA:-$DVSA_SHARED/postgres}
PG_PORT=${PG_PORT:-5432}
PG_SOCKET_DIR=${PG_SOCKET_DIR:-/tmp/dvsa-pg.$PG_PORT}
PG_USER=dvsa
PG_DB=mlflow
PYTHON=${PYTHON:-python}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1

MLFLOW_PID=$MLFLOW_SERVER_DIR/mlflow.pid     # "pid boot_id host"
PG_OWNER=$MLFLOW_SERVER_DIR/postgres.owner   # "boot_id host" of the machine that started PGDATA
BOOT_ID=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
HOST=$(uname -n)

say() { echo "mlflow_server: $*"; }
die() { echo "mlflow_server: $*" >&2; exit 1; }

local_pg() { [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; }
pg_user() { if [[ $EUID -eq 0 ]]; then echo postgres; else id -un; fi; }
as_pg() { if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
give_pg() { if [[ $EUID -eq 0 ]]; then chown postgres: "$@"; fi; }   # as root: hand a path to postgres

pg_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    local d
    if d=$(command -v pg_ctl 2>/dev/null); then dirname "$(readlink -f "$d")"; return; fi
    d=$(for c in /usr/lib/postgresql/*/bin; do if [[ -x "$c/pg_ctl" ]]; then echo "$c"; fi; done | sort -V | tail -n 1)
    [[ -n "$d" ]] || die "no PostgreSQL found (initdb/pg_ctl): install it (apt-get install postgresql) or set PG_BIN"
    echo "$d"
}

uri_host() { if [[ "$1" == *:* ]]; then echo "[$1]"; else echo "$1"; fi; }
tracking_uri() { echo "http://$(uri_host "$MLFLOW_HOST"):$MLFLOW_PORT"; }

# GET /health with Python's stdlib (curl is not in every image); exit 0 on 200.
health() {
    "$PYTHON" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/health", timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

# The mlflow server this script started on this machine (this boot), if it still runs: its pid.
mlflow_pid() {
    [[ -f "$MLFLOW_PID" ]] || return 1
    local pid boot host
    read -r pid boot host _ < "$MLFLOW_PID" || return 1
    [[ "$boot" == "$BOOT_ID" && "$host" == "$HOST" && "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "mlflow server" || return 1
    echo "$pid"
}

# ---------------------------------------------------------------------------------- PostgreSQL

pg_running() { as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

# PGDATA's postmaster.pid after a crash or a terminated head: PostgreSQL removes a stale lock
# itself only when no process has its pid; a lock of another machine may name a live pid here.
check_pg_lock() {
    local lock=$PGDATA/postmaster.pid boot="" host=""
    [[ -f "$lock" ]] || return 0
    if [[ -f "$PG_OWNER" ]]; then read -r boot host _ < "$PG_OWNER"; fi
    if [[ "$boot" == "$BOOT_ID" ]]; then
        local pid
        pid=$(head -n 1 "$lock")
        if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q postgres; then
            say "removing the stale PostgreSQL lock of pid $pid (no longer running)"
            rm -f "$lock"
        fi
    elif [[ "$host" == "$HOST" ]]; then
        say "removing the PostgreSQL lock of an earlier boot of this machine"
        rm -f "$lock"
    elif [[ "${MLFLOW_PG_TAKEOVER:-0}" == 1 ]]; then
        say "PGDATA was last started on ${host:-an unknown machine}; MLFLOW_PG_TAKEOVER=1: taking it over"
        rm -f "$lock"
    else
        die "$PGDATA is locked by a PostgreSQL started on ${host:-another machine}; if that machine is gone, rerun with MLFLOW_PG_TAKEOVER=1"
    fi
}

pg_start() {
    local bin owner
    bin=$(pg_bin)
    owner=$(pg_user)
    mkdir -p "$(dirname "$PGDATA")"
    if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
        say "initdb $PGDATA (once)"
        mkdir -p "$PGDATA"
        give_pg "$PGDATA"
        chmod 700 "$PGDATA"
        as_pg test -w "$PGDATA" || die "$owner cannot write $PGDATA (its parent dirs must let $owner through)"
        as_pg "$bin/initdb" -D "$PGDATA" -U "$PG_USER" -A trust --encoding=UTF8 --locale=C >/dev/null
        # Loopback only, trust: the unix socket sits in a 0700 dir of the server's user, TCP is
        # 127.0.0.1. No line for any other address, so a wider listen_addresses still admits nobody.
        printf '%s\n' "# written by cluster/mlflow_server.sh" \
            "local all all trust" "host all all 127.0.0.1/32 trust" > "$PGDATA/pg_hba.conf"
        printf '%s\n' "listen_addresses = '127.0.0.1'" >> "$PGDATA/postgresql.conf"
        give_pg "$PGDATA/pg_hba.conf"
    fi
    if pg_running; then
        say "PostgreSQL already running (PGDATA $PGDATA)"
    else
        check_pg_lock
        if [[ -e "$PG_SOCKET_DIR" || -L "$PG_SOCKET_DIR" ]]; then
            [[ -d "$PG_SOCKET_DIR" && ! -L "$PG_SOCKET_DIR" && "$(stat -c %U "$PG_SOCKET_DIR")" == "$owner" ]] \
                || die "$PG_SOCKET_DIR exists and is not a directory of $owner: set PG_SOCKET_DIR"
        else
            mkdir -m 700 "$PG_SOCKET_DIR"
            give_pg "$PG_SOCKET_DIR"
        fi
        touch "$MLFLOW_SERVER_DIR/postgres.log"
        give_pg "$MLFLOW_SERVER_DIR/postgres.log"
        echo "$BOOT_ID $HOST" > "$PG_OWNER"
        as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$MLFLOW_SERVER_DIR/postgres.log" -w -t 120 \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_SOCKET_DIR" start >/dev/null \
            || die "PostgreSQL did not start: see $MLFLOW_SERVER_DIR/postgres.log"
        say "PostgreSQL up on 127.0.0.1:$PG_PORT (PGDATA $PGDATA)"
    fi
    local psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER")
    if [[ "$("${psql[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
        "${psql[@]}" -d postgres -c "CREATE DATABASE $PG_DB" >/dev/null
        say "created database $PG_DB"
    fi
}

pg_stop() {
    local boot="" host=""
    if [[ -f "$PG_OWNER" ]]; then read -r boot host _ < "$PG_OWNER"; fi
    if [[ "$boot" != "$BOOT_ID" ]]; then
        say "PostgreSQL was not started on this machine (this boot): left alone"
    elif pg_running; then
        as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >/dev/null
        rmdir "$PG_SOCKET_DIR" 2>/dev/null || true     # empty once PostgreSQL is down
        say "PostgreSQL stopped"
    else
        say "PostgreSQL not running"
    fi
}

# ---------------------------------------------------------------------------------- MLflow

mlflow_start() {
    local pid uri store
    uri=$(tracking_uri)
    if pid=$(mlflow_pid); then
        if health "$uri"; then
            say "already running (pid $pid)"
            echo "MLFLOW_TRACKING_URI=$uri"
            return 0
        fi
        say "pid $pid does not answer yet; waiting"
    else
        if health "$uri"; then
            die "something else already answers at $uri (not started by this script): stop it or pick MLFLOW_PORT"
        fi
        if local_pg; then
            store="postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
        else
            store=$MLFLOW_BACKEND_STORE_URI
        fi
        mkdir -p "$MLFLOW_ARTIFACTS"
        local h
        h=$(uri_host "$MLFLOW_HOST")
        # --allowed-hosts: the Host header a request may carry. Guards against DNS rebinding (a web
        # page in a browser on the private network, or on a laptop with the SSH tunnel, making its
        # own domain resolve to this address and driving the API). Allowed: the address the nodes
        # use and loopback names (an `ssh -L` / port-forward tunnel). MLflow's default would also
        # admit patterns like 10.* and 192.168.*, which a domain name such as 10.evil.example matches.
        # --cors-allowed-origins: which web origins may send state-changing (POST/PATCH/DELETE)
        # requests from a browser: the UI served at this address (localhost origins are always
        # allowed by MLflow). Python clients (Ray workers, drivers) send no Origin: unaffected.
        local allowed="$h:$MLFLOW_PORT,$h,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
        local origins="http://$h:$MLFLOW_PORT"
        if [[ -n "${MLFLOW_ALLOWED_HOSTS_EXTRA:-}" ]]; then allowed="$allowed,$MLFLOW_ALLOWED_HOSTS_EXTRA"; fi
        if [[ -n "${MLFLOW_CORS_ORIGINS_EXTRA:-}" ]]; then origins="$origins,$MLFLOW_CORS_ORIGINS_EXTRA"; fi
        # Own session (setsid): `stop` signals the whole group (the uvicorn workers too), and
        # the server outlives the shell (a `ray up` command session) that started it.
        env -u MLFLOW_TRACKING_URI setsid "$PYTHON" -m mlflow server \
            --backend-store-uri "$store" \
            --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS" \
            --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
            --allowed-hosts "$allowed" --cors-allowed-origins "$origins" \
            </dev/null >>"$MLFLOW_SERVER_DIR/mlflow.log" 2>&1 &
        pid=$!
        echo "$pid $BOOT_ID $HOST" > "$MLFLOW_PID"
        say "mlflow server starting (pid $pid, log $MLFLOW_SERVER_DIR/mlflow.log)"
    fi
    local t0=$SECONDS
    until health "$uri"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$MLFLOW_SERVER_DIR/mlflow.log" >&2 || true
            die "mlflow server exited: see $MLFLOW_SERVER_DIR/mlflow.log"
        fi
        if (( SECONDS - t0 >= MLFLOW_START_TIMEOUT )); then
            die "mlflow server did not answer $uri/health within ${MLFLOW_START_TIMEOUT}s (still starting? see $MLFLOW_SERVER_DIR/mlflow.log; MLFLOW_START_TIMEOUT)"
        fi
        sleep 1
    done
    say "up after $((SECONDS - t0)) s"
    echo "$uri" > "$MLFLOW_SERVER_DIR/tracking_uri"
    echo "MLFLOW_TRACKING_URI=$uri"
}

mlflow_stop() {
    local pid
    if ! pid=$(mlflow_pid); then
        say "mlflow server not running (no live server of this script on this machine)"
        rm -f "$MLFLOW_PID"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$MLFLOW_PID"
    say "mlflow server stopped (pid $pid)"
}

# A TCP relay from this node's loopback to the server, in the foreground (Ctrl-C or the end of
# the SSH session stops it). Ray's `--port-forward` tunnels reach the head's 127.0.0.1 only, where
# the server (bound to the private address) does not listen.
relay() {
    local uri=${1#http://} port=${MLFLOW_RELAY_PORT:-$MLFLOW_PORT}
    say "relay 127.0.0.1:$port -> $uri (Ctrl-C ends it)"
    exec "$PYTHON" - "$port" "${uri%:*}" "${uri##*:}" <<'EOF'
import asyncio, sys

port, host, target = int(sys.argv[1]), sys.argv[2].strip("[]"), int(sys.argv[3])

async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except OSError:
        pass

async def handle(r1, w1):
    try:
        r2, w2 = await asyncio.open_connection(host, target)
    except OSError:
        w1.close()
        return
    await asyncio.gather(pipe(r1, w2), pipe(r2, w1))
    w1.close()
    w2.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass
EOF
}

# ---------------------------------------------------------------------------------- main

check_host() {
    [[ -n "${MLFLOW_HOST:-}" ]] || die "set MLFLOW_HOST to this node's private address (e.g. \$(hostname -I | awk '{print \$1}'))"
    case "$MLFLOW_HOST" in
        0.0.0.0|::|"[::]"|"*"|0|::0) die "MLFLOW_HOST=$MLFLOW_HOST would answer on every interface: give the node's private address" ;;
    esac
}

case "${1:-}" in
    start)
        check_host
        mkdir -p "$MLFLOW_SERVER_DIR"
        if local_pg; then pg_start; fi
        mlflow_start
        ;;
    stop)
        mlflow_stop
        if local_pg; then pg_stop; fi
        ;;
    status)
        rc=0
        if pid=$(mlflow_pid); then
            if [[ -n "${MLFLOW_HOST:-}" ]]; then uri=$(tracking_uri); else uri=$(cat "$MLFLOW_SERVER_DIR/tracking_uri" 2>/dev/null || true); fi
            if health "$uri"; then
                say "mlflow server: running (pid $pid) at $uri"
            else
                say "mlflow server: pid $pid, not answering $uri/health"; rc=1
            fi
        else
            say "mlflow server: not running"; rc=3
        fi
        if local_pg; then
            if pg_running; then say "PostgreSQL: running (PGDATA $PGDATA, 127.0.0.1:$PG_PORT)"
            else say "PostgreSQL: not running"; rc=3; fi
        fi
        exit "$rc"
        ;;
    relay)
        if [[ -n "${MLFLOW_HOST:-}" ]]; then uri=$(tracking_uri)
        else uri=$(cat "$MLFLOW_SERVER_DIR/tracking_uri" 2>/dev/null) || die "no tracking server started here (set MLFLOW_HOST)"; fi
        relay "$uri"
        ;;
    *)
        echo "usage: MLFLOW_HOST=<private ip> $0 {start|stop|status|relay}" >&2
        exit 2
        ;;
esac
