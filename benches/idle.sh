#!/usr/bin/env bash
# Memory per idle client: opens N client connections to pgtether and to PgBouncer (each logs
# in, runs one query, then idles) and prints each pooler's RSS growth per client. Everything
# runs on 127.0.0.1 in a temp dir removed on exit. See benches/README.md.
#
#   benches/idle.sh            # 10,000 idle clients
#   N=19000 benches/idle.sh    # as many as the open-file limit allows here
#   BUSY=1000 benches/idle.sh  # then also: peak RSS while 1,000 pgbench clients share the
#                              # pool of 20 (pgbench -S -M extended, BUSY_SECONDS each)
set -euo pipefail

N=${N:-10000}
TARGETS=${TARGETS:-"pgbouncer pgtether"}
BUSY=${BUSY:-0}                  # pgbench clients for the busy phase; 0 = no busy phase
BUSY_SECONDS=${BUSY_SECONDS:-8}
UNIX=${UNIX:-0}                  # 1 = the idle clients connect over each pooler's Unix-domain socket
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGTETHER_BIN=${PGTETHER_BIN:-$REPO_ROOT/target/release/pgtether}
PG_BINDIR=${PG_BINDIR:-$( [[ -x /usr/lib/postgresql/15/bin/initdb ]] && echo /usr/lib/postgresql/15/bin || pg_config --bindir)}

log() { printf '[idle] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Every client needs a file descriptor in the pooler and one in the client script.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) >= N + 200 && $(ulimit -n) >= BUSY + 200)) || die "ulimit -n is $(ulimit -n): too low for N=$N BUSY=$BUSY"
[[ -x $PGTETHER_BIN ]] || (cd "$REPO_ROOT" && cargo build --release)

TMPD=$(mktemp -d "${TMPDIR:-/tmp}/pgtether-idle.XXXXXX")
IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1 && chown postgres: "$TMPD"
as_pg() { if ((IS_ROOT)); then (cd "$TMPD" && runuser -u postgres -- "$@"); else (cd "$TMPD" && "$@"); fi; }
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    as_pg "$PG_BINDIR/pg_ctl" -D "$TMPD/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$TMPD"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(port)
as_pg "$PG_BINDIR/initdb" -D "$TMPD/data" -U postgres -A trust --no-sync >"$TMPD/initdb.log" 2>&1 ||
    { cat "$TMPD/initdb.log" >&2; die "initdb failed"; }
as_pg "$PG_BINDIR/pg_ctl" -D "$TMPD/data" -l "$TMPD/pg.log" -w -o \
    "-p $PG_PORT -k $TMPD -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE ROLE app LOGIN" -c "CREATE DATABASE app OWNER app"
((BUSY == 0)) || pgbench -q -i -s 1 -h 127.0.0.1 -p "$PG_PORT" -U app app >"$TMPD/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed (see $TMPD/pgbench-init.log)"

wait_port() { for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p "$1" && return 0; sleep 0.1; done; die "nothing on port $1"; }
load() { uptime | sed 's/.*load average: //'; }

for target in $TARGETS; do
    P=$(port)
    case $target in
        pgtether)
            cat >"$TMPD/pgtether.toml" <<EOF
[listen]
addr = "127.0.0.1:$P"
max_clients = $((N + BUSY + 100))
unix_socket_dir = "$TMPD"
[auth]
method = "trust"
[databases.app]
host = "127.0.0.1"
port = $PG_PORT
[users.app]
password = "app"
EOF
            "$PGTETHER_BIN" --config "$TMPD/pgtether.toml" >"$TMPD/pgtether.log" 2>&1 &
            PID=$!
            ;;
        pgbouncer)
            command -v pgbouncer >/dev/null || die "pgbouncer missing (apt-get install pgbouncer)"
            printf '"app" ""\n' >"$TMPD/users.txt"
            cat >"$TMPD/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$PG_PORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $P
unix_socket_dir = $TMPD
auth_type = trust
auth_file = $TMPD/users.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = $((N + BUSY + 100))
logfile = $TMPD/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
            ((IS_ROOT)) && chown postgres: "$TMPD"/users.txt "$TMPD"/pgbouncer.ini
            if ((IS_ROOT)); then
                runuser -u postgres -- bash -c "ulimit -n $(ulimit -n); exec pgbouncer $TMPD/pgbouncer.ini" &
            else
                pgbouncer "$TMPD/pgbouncer.ini" &
            fi
            PID=$!
            ;;
        *) die "unknown target $target" ;;
    esac
    PIDS+=("$PID")
    wait_port "$P"
    # runuser forks: measure the pooler itself, not the wrapper.
    REAL=$(pgrep -P "$PID" -x pgbouncer || echo "$PID")
    printf '%-10s load %-18s ' "$target" "$(load)"
    socket_dir=""
    if ((UNIX)); then socket_dir=$TMPD; fi
    SOCKET_DIR=$socket_dir python3 "$REPO_ROOT/benches/idle_clients.py" "$P" "$REAL" "$N" app app | tail -n 1
    if ((BUSY > 0)); then
        # The idle clients are gone; sample the pooler's RSS while BUSY clients run.
        before=$(awk '/^VmRSS/ {print $2}' "/proc/$REAL/status")
        pgbench -n -S -M extended -c "$BUSY" -j 2 -T "$BUSY_SECONDS" -h 127.0.0.1 -p "$P" -U app app \
            >"$TMPD/busy-$target.log" 2>&1 &
        BENCH=$!
        peak=$before
        while kill -0 "$BENCH" 2>/dev/null; do
            rss=$(awk '/^VmRSS/ {print $2}' "/proc/$REAL/status")
            ((rss > peak)) && peak=$rss
            sleep 0.2
        done
        wait "$BENCH" || die "pgbench failed against $target (see $TMPD/busy-$target.log)"
        tps=$(awk '/^tps/ {printf "%.0f", $3}' "$TMPD/busy-$target.log")
        printf '%-10s load %-18s busy clients: %d  rss before: %d KiB  peak: %d KiB  tps: %s\n' \
            "$target" "$(load)" "$BUSY" "$before" "$peak" "$tps"
    fi
    kill "$REAL" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
done
