#!/usr/bin/env bash
# pgbench comparison: direct PostgreSQL vs PgBouncer vs pgtether.
# See benches/README.md. Everything runs on 127.0.0.1 inside a throwaway
# temp dir that is removed on exit.
set -euo pipefail

# ---------------------------------------------------------------- settings
CLIENTS=${CLIENTS:-100}          # space-separated list of pgbench -c values
MODES=${MODES:-extended}         # space-separated list of pgbench -M values
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}         # seconds per pgbench run
THREADS=${THREADS:-2}            # pgbench -j
SCALE=${SCALE:-10}               # pgbench -i -s
POOL_SIZE=${POOL_SIZE:-20}       # server connections per pool, both poolers
TARGETS=${TARGETS:-"direct pgbouncer pgtether"}
KEEP_TMP=${KEEP_TMP:-0}          # 1 = keep temp dir (logs, configs) on exit

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGTETHER_BIN=${PGTETHER_BIN:-target/release/pgtether}
case $PGTETHER_BIN in /*) ;; *) PGTETHER_BIN=$REPO_ROOT/$PGTETHER_BIN ;; esac

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

for t in $TARGETS; do
    case $t in direct | pgbouncer | pgtether) ;; *) die "unknown target '$t' in TARGETS" ;; esac
done

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# ---------------------------------------------------------------- binaries
if [[ -n ${PG_BINDIR:-} ]]; then
    :
elif [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then
    PG_BINDIR=/usr/lib/postgresql/15/bin
else
    PG_BINDIR=$(pg_config --bindir)
fi
[[ -x $PG_BINDIR/initdb ]] || die "initdb not found in $PG_BINDIR (set PG_BINDIR)"
command -v pgbench >/dev/null || die "pgbench not on PATH"
command -v psql >/dev/null || die "psql not on PATH"

PGBOUNCER=""
if has_target pgbouncer; then
    PGBOUNCER=$(command -v pgbouncer || true)
    [[ -z $PGBOUNCER && -x /usr/sbin/pgbouncer ]] && PGBOUNCER=/usr/sbin/pgbouncer
    if [[ -z $PGBOUNCER ]]; then
        [[ $IS_ROOT -eq 1 ]] || die "pgbouncer not found and not root; install it (apt-get install pgbouncer)"
        log "installing pgbouncer"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y pgbouncer >/dev/null; then
            apt-get update >/dev/null
            apt-get install -y pgbouncer >/dev/null
        fi
        PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
        [[ -x $PGBOUNCER ]] || die "pgbouncer install failed"
    fi
fi

if has_target pgtether && [[ ! -x $PGTETHER_BIN ]]; then
    log "$PGTETHER_BIN missing; running cargo build --release"
    (cd "$REPO_ROOT" && cargo build --release)
    [[ -x $PGTETHER_BIN ]] || die "$PGTETHER_BIN still missing after build"
fi

# ---------------------------------------------------------------- helpers
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/pgtether-bench.XXXXXX")
[[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMPD"

# Run a command as the postgres OS user when we are root (initdb, postgres
# and pgbouncer refuse to run as root). cd first: postgres may not be able to
# read the caller's cwd.
as_pg() {
    if [[ $IS_ROOT -eq 1 ]]; then
        (cd "$TMPD" && runuser -u postgres -- "$@")
    else
        (cd "$TMPD" && "$@")
    fi
}

USED_PORTS=" "
port_listening() {
    # state 0A = LISTEN in /proc/net/tcp{,6}; column 2 is addr:port (hex)
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# free_port VAR: pick an unused port and store it in VAR (no subshell, so
# USED_PORTS remembers what was handed out)
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_listening "$p" && continue
        USED_PORTS+="$p "
        printf -v "$1" '%s' "$p"
        return 0
    done
    die "no free port found"
}

# wait until "SELECT 1" works through host:port as app/app
wait_ready() {
    local name=$1 port=$2 logf=$3
    for _ in $(seq 1 300); do
        if PGPASSWORD=app PGCONNECT_TIMEOUT=2 psql -X -q -t -h 127.0.0.1 -p "$port" -U app -d app \
            -c 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log "$name did not become ready on port $port; last log lines:"
    tail -n 30 "$logf" >&2 || true
    return 1
}

# utime+stime (clock ticks) of a process, all threads included.
# Strip "pid (comm) " first so a comm with spaces cannot shift fields;
# utime/stime (fields 14/15) are then the 12th/13th words.
cpu_ticks() {
    local stat rest
    [[ -r /proc/$1/stat ]] || die "process $1 is gone (pooler exited? see logs in $TMPD; KEEP_TMP=1 keeps them)"
    stat=$(<"/proc/$1/stat")
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo $((${12} + ${13}))
}
CLK_TCK=$(getconf CLK_TCK)

PG_PID="" PGB_PID="" PGT_PID=""
CLEANED=0
cleanup() {
    [[ $CLEANED -eq 1 ]] && return 0
    CLEANED=1
    set +e
    if [[ -n $PGT_PID ]] && kill -0 "$PGT_PID" 2>/dev/null; then
        kill -TERM "$PGT_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$PGT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGT_PID" 2>/dev/null
        wait "$PGT_PID" 2>/dev/null
    fi
    if [[ -n $PGB_PID ]] && kill -0 "$PGB_PID" 2>/dev/null; then
        kill -INT "$PGB_PID" 2>/dev/null   # SIGINT = immediate shutdown
        for _ in $(seq 1 50); do kill -0 "$PGB_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGB_PID" 2>/dev/null
    fi
    if [[ -f $TMPD/data/postmaster.pid ]]; then
        as_pg "$PG_BINDIR/pg_ctl" -D "$TMPD/data" -m immediate -w stop >/dev/null 2>&1 ||
            { [[ -n $PG_PID ]] && kill -QUIT "$PG_PID" 2>/dev/null; }
    fi
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $TMPD"
    else
        rm -rf "$TMPD"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

LOAD_START=$(cat /proc/loadavg)
log "temp dir $TMPD; loadavg at start: $LOAD_START"

# ---------------------------------------------------------------- postgres
PG_PORT=""
free_port PG_PORT
log "initdb + postgres on 127.0.0.1:$PG_PORT"
as_pg "$PG_BINDIR/initdb" -D "$TMPD/data" -U postgres -A trust -E UTF8 --no-sync \
    >"$TMPD/initdb.log" 2>&1 || { cat "$TMPD/initdb.log" >&2; die "initdb failed"; }
cat >>"$TMPD/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMPD'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
password_encryption = 'scram-sha-256'
EOF
cat >"$TMPD/data/pg_hba.conf" <<EOF
local all all                trust
host  all postgres 127.0.0.1/32 trust
host  all app      127.0.0.1/32 scram-sha-256
EOF
[[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMPD/data/postgresql.conf" "$TMPD/data/pg_hba.conf"
as_pg "$PG_BINDIR/pg_ctl" -D "$TMPD/data" -l "$TMPD/postgres.log" -w -t 60 start >/dev/null ||
    { tail -n 30 "$TMPD/postgres.log" >&2; die "postgres failed to start"; }
PG_PID=$(head -n 1 "$TMPD/data/postmaster.pid")

psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres >/dev/null <<'EOF'
SET password_encryption = 'scram-sha-256';
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
EOF
log "pgbench -i -s $SCALE"
PGPASSWORD=app pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U app app \
    >"$TMPD/pgbench-init.log" 2>&1 || { cat "$TMPD/pgbench-init.log" >&2; die "pgbench -i failed"; }

# ---------------------------------------------------------------- pgbouncer
PGB_PORT=""
if has_target pgbouncer; then
    free_port PGB_PORT
    log "pgbouncer ($($PGBOUNCER --version | head -n 1)) on 127.0.0.1:$PGB_PORT"
    printf '"app" "app"\n' >"$TMPD/userlist.txt"
    cat >"$TMPD/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$PG_PORT dbname=app

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir = $TMPD
pidfile = $TMPD/pgbouncer.pid
logfile = $TMPD/pgbouncer.log
auth_type = scram-sha-256
auth_file = $TMPD/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
EOF
    [[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMPD/userlist.txt" "$TMPD/pgbouncer.ini"
    # -d: daemonize, so the pidfile holds the real pgbouncer pid (runuser forks)
    as_pg "$PGBOUNCER" -d "$TMPD/pgbouncer.ini" >"$TMPD/pgbouncer.out" 2>&1 ||
        { cat "$TMPD/pgbouncer.out" "$TMPD/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer failed to start"; }
    for _ in $(seq 1 50); do [[ -s $TMPD/pgbouncer.pid ]] && break; sleep 0.1; done
    [[ -s $TMPD/pgbouncer.pid ]] || die "pgbouncer wrote no pidfile"
    PGB_PID=$(<"$TMPD/pgbouncer.pid")
    wait_ready pgbouncer "$PGB_PORT" "$TMPD/pgbouncer.log" || die "pgbouncer not ready"
fi

# ---------------------------------------------------------------- pgtether
PGT_PORT="" PGT_HTTP_PORT=""
if has_target pgtether; then
    free_port PGT_PORT
    free_port PGT_HTTP_PORT
    log "pgtether ($PGTETHER_BIN) on 127.0.0.1:$PGT_PORT (http $PGT_HTTP_PORT)"
    cat >"$TMPD/pgtether.toml" <<EOF
[listen]
addr = "127.0.0.1:$PGT_PORT"
max_clients = 10000

[http]
addr = "127.0.0.1:$PGT_HTTP_PORT"

[pool]
mode = "transaction"
size = $POOL_SIZE
acquire_timeout = "30s"

[auth]
method = "scram-sha-256"

[databases.app]
host = "127.0.0.1"
port = $PG_PORT
dbname = "app"

[users.app]
password = "app"
EOF
    # setsid: own session, so a Ctrl-C meant for this script does not reach it
    # (cleanup stops it). Not a group leader here, so setsid execs in place and
    # $! is pgtether's own pid.
    setsid "$PGTETHER_BIN" --config "$TMPD/pgtether.toml" >"$TMPD/pgtether.log" 2>&1 &
    PGT_PID=$!
    wait_ready pgtether "$PGT_PORT" "$TMPD/pgtether.log" || die "pgtether not ready"
fi

# ---------------------------------------------------------------- runs
RESULTS=$TMPD/results.tsv   # clients mode round target tps lat_ms cpu_us_per_txn
: >"$RESULTS"

port_of() {
    case $1 in
        direct) echo "$PG_PORT" ;;
        pgbouncer) echo "$PGB_PORT" ;;
        pgtether) echo "$PGT_PORT" ;;
    esac
}
pid_of() {
    case $1 in
        pgbouncer) echo "$PGB_PID" ;;
        pgtether) echo "$PGT_PID" ;;
        *) echo "" ;;
    esac
}

ROW_FMT='%-8s %-9s %5s %-10s %12s %10s %12s\n'
run_one() {
    local c=$1 mode=$2 round=$3 target=$4 port pid j out before after
    local tps lat txns cpu_us="-" ok=1
    port=$(port_of "$target")
    pid=$(pid_of "$target")
    j=$THREADS
    ((c < j)) && j=$c
    out=$TMPD/run-$c-$mode-$round-$target.log
    [[ -n $pid ]] && before=$(cpu_ticks "$pid")
    PGPASSWORD=app pgbench -n -S -M "$mode" -c "$c" -j "$j" -T "$DURATION" \
        -h 127.0.0.1 -p "$port" -U app app >"$out" 2>&1 || ok=0
    [[ -n $pid ]] && after=$(cpu_ticks "$pid")
    tps=$(awk '/^tps = .*without initial connection time/ { print $3 }' "$out")
    lat=$(awk '/^latency average = / { print $4 }' "$out")
    txns=$(awk -F': *' '/^number of transactions actually processed:/ { split($2, a, "/"); print a[1] }' "$out")
    if [[ $ok -eq 0 || -z $tps || -z $txns ]]; then
        log "pgbench against $target failed (c=$c mode=$mode); log $out:"
        { grep -m 3 -i 'error' "$out" || tail -n 5 "$out"; } >&2
        tps=ERR lat=ERR txns=""  # a run with errors is left out of the medians
    fi
    if [[ -z $lat ]]; then lat=NA; fi
    if [[ -n $pid && -n $txns && $txns -gt 0 ]]; then
        cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$txns" \
            'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    fi
    # shellcheck disable=SC2059
    printf "$ROW_FMT" "$c" "$mode" "$round" "$target" "$tps" "$lat" "$cpu_us"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$mode" "$round" "$target" "$tps" "$lat" "$cpu_us" >>"$RESULTS"
}

echo
echo "pgbench -S -n -T $DURATION -j $THREADS, scale $SCALE, pool size $POOL_SIZE, $ROUNDS round(s)"
echo "CPU us/txn = pooler process utime+stime during the run / transactions processed"
echo
# shellcheck disable=SC2059
printf "$ROW_FMT" clients mode round target tps lat_ms cpu_us/txn
for c in $CLIENTS; do
    for mode in $MODES; do
        for round in $(seq 1 "$ROUNDS"); do
            for target in $TARGETS; do
                run_one "$c" "$mode" "$round" "$target"
            done
        done
    done
done

# ---------------------------------------------------------------- summary
LOAD_END=$(cat /proc/loadavg)
echo
echo "Summary (median over $ROUNDS round(s); ratios = pgtether / pgbouncer)"
awk -F'\t' -v targets="$TARGETS" '
function median(key,    n, i, j, v, tmp) {
    n = cnt[key]
    if (n == 0) return "NA"
    for (i = 1; i <= n; i++) v[i] = vals[key, i]
    for (i = 2; i <= n; i++) { tmp = v[i]; for (j = i - 1; j >= 1 && v[j] > tmp; j--) v[j + 1] = v[j]; v[j + 1] = tmp }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function add(key, x) { if (x ~ /^[0-9.]+$/) vals[key, ++cnt[key]] = x + 0 }
function fmt(x, p) { return (x == "NA") ? "NA" : sprintf(p, x) }
function ratio(a, b) { return (a == "NA" || b == "NA" || b == 0) ? "-" : sprintf("%.3f", a / b) }
{
    g = $1 SUBSEP $2
    if (!(g in seen)) { seen[g] = 1; order[++ng] = g }
    add(g SUBSEP $4 SUBSEP "tps", $5)
    add(g SUBSEP $4 SUBSEP "lat", $6)
    add(g SUBSEP $4 SUBSEP "cpu", $7)
}
END {
    nt = split(targets, T, " ")
    printf "%-8s %-9s %-10s %12s %10s %12s\n", "clients", "mode", "target", "tps", "lat_ms", "cpu_us/txn"
    for (k = 1; k <= ng; k++) {
        g = order[k]; split(g, gp, SUBSEP)
        for (i = 1; i <= nt; i++) {
            t = T[i]
            m_tps[t] = median(g SUBSEP t SUBSEP "tps")
            m_lat[t] = median(g SUBSEP t SUBSEP "lat")
            m_cpu[t] = median(g SUBSEP t SUBSEP "cpu")
            printf "%-8s %-9s %-10s %12s %10s %12s\n", gp[1], gp[2], t,
                fmt(m_tps[t], "%.1f"), fmt(m_lat[t], "%.3f"), (m_cpu[t] == "NA") ? "-" : fmt(m_cpu[t], "%.2f")
        }
        if (("pgtether" in m_tps) && ("pgbouncer" in m_tps))
            printf "%-8s %-9s ratio pgtether/pgbouncer: tps %s, cpu_us/txn %s\n", gp[1], gp[2],
                ratio(m_tps["pgtether"], m_tps["pgbouncer"]), ratio(m_cpu["pgtether"], m_cpu["pgbouncer"])
    }
}' "$RESULTS"
echo
echo "loadavg at start: $LOAD_START"
echo "loadavg at end:   $LOAD_END"
if [[ -n ${RESULTS_OUT:-} ]]; then
    cp "$RESULTS" "$RESULTS_OUT"
    echo "raw results copied to $RESULTS_OUT"
fi
