#!/usr/bin/env bash
# pgbench comparison: direct PostgreSQL vs PgBouncer vs pgtether (with and
# without session-state tracking). See benches/README.md. Everything runs on 127.0.0.1 inside a throwaway
# temp dir that is removed on exit.
set -euo pipefail

# ---------------------------------------------------------------- settings
CLIENTS=${CLIENTS:-100}          # space-separated list of pgbench -c values
MODES=${MODES:-extended}         # space-separated list of pgbench -M values
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}         # seconds per pgbench run
THREADS=${THREADS:-2}            # pgbench -j
SCALE=${SCALE:-10}               # pgbench -i -s
POOL_SIZE=${POOL_SIZE:-20}       # server connections per non-session pool, all poolers
POOL_MODE=${POOL_MODE:-transaction}  # session | transaction | statement, all poolers
SCRIPT=${SCRIPT:-select-only}    # pgbench built-in script: select-only (-S) | tpcb-like | simple-update
TARGETS=${TARGETS:-"direct pgbouncer pgtether"}
KEEP_TMP=${KEEP_TMP:-0}          # 1 = keep temp dir (logs, configs) on exit
SAMPLING=${SAMPLING:-0.1}        # share of transactions pgbench logs for p99 (--sampling-rate)
WARMUP=${WARMUP:-3}              # seconds of unmeasured pgbench per target before the rounds (0 = none)
TLS=${TLS:-0}                    # 1 = pgbench reaches the poolers over TLS (direct stays plain)
UNIX=${UNIX:-0}                  # 1 = pgbench reaches every target over its Unix-domain socket
UPSTREAM_UNIX=${UPSTREAM_UNIX:-0}  # 1 = the poolers reach PostgreSQL over its Unix-domain socket
CONNECT=${CONNECT:-0}            # 1 = pgbench -C: a new connection (login) per transaction

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGTETHER_BIN=${PGTETHER_BIN:-target/release/pgtether}
case $PGTETHER_BIN in /*) ;; *) PGTETHER_BIN=$REPO_ROOT/$PGTETHER_BIN ;; esac
BASE_BIN=${BASE_BIN:-}            # another pgtether build, run as target pgtether_base (A/B of two builds)
TOGETHER=${TOGETHER:-0}          # 1 = TARGETS="pgtether pgtether_base" run at the same time, half the clients each

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

for t in $TARGETS; do
    case $t in
        direct | pgbouncer | pgtether | pgtether_notrack | pgtether_1w | pgtether_unnamed | pgtether_peers) ;;
        pgtether_base) [[ -x $BASE_BIN ]] || die "target pgtether_base needs BASE_BIN, an executable pgtether build" ;;
        *) die "unknown target '$t' in TARGETS" ;;
    esac
done
[[ $TLS == 1 && $UNIX == 1 ]] && die "TLS=1 and UNIX=1 do not mix (libpq uses no TLS on Unix sockets)"
# Two builds run at once see the same machine: its drift from minute to minute, which moves a
# ratio by ±10% between rounds run one after the other, hits both alike.
if [[ $TOGETHER == 1 ]]; then
    [[ $(echo "$TARGETS" | tr ' ' '\n' | grep -v '^$' | sort | tr '\n' ' ') == "pgtether pgtether_base " ]] ||
        die "TOGETHER=1 needs TARGETS=\"pgtether pgtether_base\" (and BASE_BIN)"
fi
# The CPU columns cover pgbench's progress reports 1 to DURATION-1.
[[ $DURATION =~ ^[0-9]+$ ]] && ((DURATION >= 3)) || die "DURATION must be at least 3 (seconds)"
case $POOL_MODE in session | transaction | statement) ;; *) die "POOL_MODE must be session, transaction or statement" ;; esac
case $SCRIPT in select-only | tpcb-like | simple-update) ;; *) die "SCRIPT must be select-only, tpcb-like or simple-update" ;; esac
for m in $MODES; do
    case $m in simple | extended | prepared) ;; *) die "unknown pgbench -M mode '$m' in MODES" ;; esac
done

MAX_CLIENTS=0
for c in $CLIENTS; do
    [[ $c =~ ^[0-9]+$ && $c -gt 0 ]] || die "CLIENTS must be positive integers"
    ((c > MAX_CLIENTS)) && MAX_CLIENTS=$c
done
# A session-mode pool holds a server connection per connected client, so it is
# sized for every client (a smaller one would leave clients waiting the whole
# run). Other pools get POOL_SIZE.
SESSION_POOL_SIZE=${SESSION_POOL_SIZE:-$MAX_CLIENTS}
if [[ $POOL_MODE == session ]]; then MAIN_POOL_SIZE=$SESSION_POOL_SIZE; else MAIN_POOL_SIZE=$POOL_SIZE; fi
# PgBouncer 1.18 cannot run -M prepared in transaction (or statement) mode, nor
# can pgtether with track_session_state = false: for -M prepared they use a
# second database entry, app_session, pooled in session mode. pgtether with
# tracking always uses POOL_MODE.
SESSION_FOR_PREPARED=0
[[ $POOL_MODE != session && " $MODES " == *" prepared "* ]] && SESSION_FOR_PREPARED=1

case $SCRIPT in select-only) SCRIPT_ARGS=(-S) ;; *) SCRIPT_ARGS=(-b "$SCRIPT") ;; esac
# -C: each transaction logs in and out, so the CPU columns become the cost of a login.
[[ $CONNECT == 1 ]] && SCRIPT_ARGS+=(-C)

# Many clients need many file descriptors (pgbench, poolers, postgres).
if [[ $(ulimit -n) != unlimited ]] && (($(ulimit -n) < 20000)); then
    ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
if [[ $(ulimit -n) != unlimited ]] && (($(ulimit -n) < 2 * MAX_CLIENTS + 256)); then
    log "WARNING: ulimit -n is $(ulimit -n), low for $MAX_CLIENTS clients (raise the hard limit)"
fi

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

if { has_target pgtether || has_target pgtether_notrack || has_target pgtether_1w || has_target pgtether_unnamed || has_target pgtether_peers; } && [[ ! -x $PGTETHER_BIN ]]; then
    log "$PGTETHER_BIN missing; running cargo build --release"
    (cd "$REPO_ROOT" && cargo build --release)
    [[ -x $PGTETHER_BIN ]] || die "$PGTETHER_BIN still missing after build"
fi

# ---------------------------------------------------------------- helpers
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/pgtether-bench.XXXXXX")
[[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMPD"

# TLS=1: one self-signed certificate for both poolers; pgbench requires TLS from them.
if [[ $TLS == 1 ]]; then
    command -v openssl >/dev/null || die "TLS=1 needs openssl"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -keyout "$TMPD/tls.key" -out "$TMPD/tls.crt" >/dev/null 2>&1 ||
        die "openssl could not make a certificate"
    [[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMPD/tls.key" "$TMPD/tls.crt"
fi
# host_of: where pgbench connects (the socket directory holds every target's socket)
host_of() {
    if [[ $UNIX == 1 ]]; then echo "$TMPD"; else echo 127.0.0.1; fi
}
# sslmode_of TARGET: how pgbench connects to it
sslmode_of() {
    if [[ $TLS == 1 && $1 != direct ]]; then echo require; else echo disable; fi
}

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
port_in_use() {
    # any socket (listening or connected) with this local port in
    # /proc/net/tcp{,6}; column 2 is local addr:port (hex)
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR > 1 && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# Listen ports come from below the kernel's ephemeral range, so an outgoing
# connection (pgbench, a pooler's server connections) cannot take one between
# the check and the bind.
PORT_LO=20000 PORT_HI=60000
if read -r EPH_LO _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null && ((EPH_LO > 12000)); then
    PORT_LO=10000 PORT_HI=$((EPH_LO - 1))
fi
# free_port VAR: pick an unused port and store it in VAR (no subshell, so
# USED_PORTS remembers what was handed out)
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((PORT_LO + RANDOM % (PORT_HI - PORT_LO + 1)))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_in_use "$p" && continue
        USED_PORTS+="$p "
        printf -v "$1" '%s' "$p"
        return 0
    done
    die "no free port found"
}

# wait until "SELECT 1" works through host:port as app/app; gives up at once
# when the optional PID has exited
wait_ready() {
    local name=$1 port=$2 logf=$3 pid=${4:-}
    for _ in $(seq 1 300); do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited; last log lines:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
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

# ticks_of "PID..." : utime and stime (clock ticks) of the processes, all threads included, or
# "0 0" for none; a process that is gone counts nothing (this runs beside pgbench, which may have
# failed). "pid (comm) " is stripped first so a comm with spaces cannot shift fields; utime and
# stime (fields 14/15) are then the 12th/13th words.
ticks_of() {
    local stat rest pid utime=0 stime=0
    for pid in $1; do
        stat=$(<"/proc/$pid/stat") 2>/dev/null || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086
        set -- $rest
        utime=$((utime + ${12}))
        stime=$((stime + ${13}))
    done
    echo "$utime $stime"
}

CLK_TCK=$(getconf CLK_TCK)

# utime+stime (clock ticks) of PostgreSQL: the postmaster, its reaped children
# (cutime/cstime: backends that exited) and its live children.
pg_ticks() {
    local stat rest total=0 pid
    stat=$(<"/proc/$PG_PID/stat")
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    total=$((${12} + ${13} + ${14} + ${15}))
    for pid in $(pgrep -P "$PG_PID"); do
        stat=$(<"/proc/$pid/stat") 2>/dev/null || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086
        set -- $rest
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

PG_PID="" PGB_PID="" PGT_PID="" PGTN_PID="" PGT1_PID="" PGTP_PID="" PGTP2_PID=""
CLEANED=0
stop_pgtether() {
    local pid=$1
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
}
cleanup() {
    [[ $CLEANED -eq 1 ]] && return 0
    CLEANED=1
    set +e
    stop_pgtether "$PGT_PID"
    stop_pgtether "$PGTN_PID"
    stop_pgtether "$PGT1_PID"
    stop_pgtether "$PGTP_PID"
    stop_pgtether "$PGTP2_PID"
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
# Server connections needed at once: every client of a direct run, plus every
# pool of every pooler (pools stay open between runs). Direct runs with more
# than 190 clients need max_connections above the default of 200.
MAX_CONN=10
has_target direct && MAX_CONN=$((MAX_CONN + MAX_CLIENTS))
for t in pgbouncer pgtether pgtether_notrack pgtether_1w pgtether_unnamed pgtether_peers pgtether_base; do
    has_target "$t" || continue
    MAX_CONN=$((MAX_CONN + MAIN_POOL_SIZE))
    [[ $SESSION_FOR_PREPARED -eq 1 && $t != pgtether && $t != pgtether_1w && $t != pgtether_unnamed && $t != pgtether_peers && $t != pgtether_base ]] && MAX_CONN=$((MAX_CONN + SESSION_POOL_SIZE))
done
((MAX_CONN < 200)) && MAX_CONN=200
((MAX_CLIENTS > 190 && MAX_CONN < 1100)) && MAX_CONN=1100

PG_PORT=""
free_port PG_PORT
log "initdb + postgres on 127.0.0.1:$PG_PORT (max_connections $MAX_CONN)"
as_pg "$PG_BINDIR/initdb" -D "$TMPD/data" -U postgres -A trust -E UTF8 --no-sync \
    >"$TMPD/initdb.log" 2>&1 || { cat "$TMPD/initdb.log" >&2; die "initdb failed"; }
cat >>"$TMPD/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMPD'
max_connections = $MAX_CONN
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
# Where the poolers reach PostgreSQL.
UPSTREAM_HOST=127.0.0.1
[[ $UPSTREAM_UNIX == 1 ]] && UPSTREAM_HOST=$TMPD
PGB_PORT=""
if has_target pgbouncer; then
    free_port PGB_PORT
    log "pgbouncer ($($PGBOUNCER --version | head -n 1)) on 127.0.0.1:$PGB_PORT"
    printf '"app" "app"\n' >"$TMPD/userlist.txt"
    cat >"$TMPD/pgbouncer.ini" <<EOF
[databases]
app = host=$UPSTREAM_HOST port=$PG_PORT dbname=app pool_mode=$POOL_MODE pool_size=$MAIN_POOL_SIZE
app_session = host=$UPSTREAM_HOST port=$PG_PORT dbname=app pool_mode=session pool_size=$SESSION_POOL_SIZE

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir = $TMPD
pidfile = $TMPD/pgbouncer.pid
logfile = $TMPD/pgbouncer.log
auth_type = scram-sha-256
auth_file = $TMPD/userlist.txt
pool_mode = $POOL_MODE
default_pool_size = $MAIN_POOL_SIZE
max_client_conn = $((MAX_CLIENTS + 1000))
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
EOF
    if [[ $TLS == 1 ]]; then
        printf 'client_tls_sslmode = require\nclient_tls_key_file = %s\nclient_tls_cert_file = %s\n' \
            "$TMPD/tls.key" "$TMPD/tls.crt" >>"$TMPD/pgbouncer.ini"
    fi
    [[ $IS_ROOT -eq 1 ]] && chown postgres: "$TMPD/userlist.txt" "$TMPD/pgbouncer.ini"
    # -d: daemonize, so the pidfile holds the real pgbouncer pid (runuser forks). runuser
    # resets the open-file limit to 1,024, which PgBouncer does not raise and which 1,000
    # clients with 20 server connections overflow (accept() then fails and clients hang): it
    # gets this script's limit back.
    # shellcheck disable=SC2016
    as_pg sh -c 'ulimit -n "$1" 2>/dev/null; shift; exec "$@"' sh "$(ulimit -n)" \
        "$PGBOUNCER" -d "$TMPD/pgbouncer.ini" >"$TMPD/pgbouncer.out" 2>&1 ||
        { cat "$TMPD/pgbouncer.out" "$TMPD/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer failed to start"; }
    for _ in $(seq 1 50); do [[ -s $TMPD/pgbouncer.pid ]] && break; sleep 0.1; done
    [[ -s $TMPD/pgbouncer.pid ]] || die "pgbouncer wrote no pidfile"
    PGB_PID=$(<"$TMPD/pgbouncer.pid")
    wait_ready pgbouncer "$PGB_PORT" "$TMPD/pgbouncer.log" || die "pgbouncer not ready"
fi

# ---------------------------------------------------------------- pgtether
# start_pgtether NAME TRACK PORT_VAR PID_VAR [WORKERS [PREPARE_UNNAMED [SIZE PORT [DEFER]]]]:
# one pgtether process with its own config, ports and log; track_session_state = TRACK. With
# PORT, it listens there with reuse_port (a peer of another process on that port) and a pool of
# SIZE. With DEFER, only its config is written ($TMPD/NAME.toml): the caller starts it.
start_pgtether() {
    local name=$1 track=$2 unnamed=${6:-false} size=${7:-$MAIN_POOL_SIZE} port=${8:-} http pid
    local bin=$PGTETHER_BIN
    [[ $name == pgtether_base ]] && bin=$BASE_BIN
    local reuse=false
    if [[ -n $port ]]; then reuse=true; else free_port port; fi
    free_port http
    log "$name ($bin, track_session_state = $track) on 127.0.0.1:$port (http $http)"
    cat >"$TMPD/$name.toml" <<EOF
[listen]
addr = "127.0.0.1:$port"
max_clients = 10000
unix_socket_dir = "$TMPD"
reuse_port = $reuse

[http]
addr = "127.0.0.1:$http"

[pool]
mode = "$POOL_MODE"
size = $size
acquire_timeout = "$((DURATION + 60))s"
track_session_state = $track
prepare_unnamed = $unnamed

[auth]
method = "scram-sha-256"

[databases.app]
host = "$UPSTREAM_HOST"
port = $PG_PORT
dbname = "app"

[databases.app_session]
host = "$UPSTREAM_HOST"
port = $PG_PORT
dbname = "app"

[databases.app_session.pool]
mode = "session"
size = $SESSION_POOL_SIZE

[users.app]
password = "app"

[runtime]
worker_threads = ${5:-${PGTETHER_WORKERS:-0}}
EOF
    if [[ $TLS == 1 ]]; then
        printf '\n[tls]\ncert_file = "%s"\nkey_file = "%s"\nclient_mode = "require"\n' \
            "$TMPD/tls.crt" "$TMPD/tls.key" >>"$TMPD/$name.toml"
    fi
    [[ -n ${9:-} ]] && return 0
    # setsid: own session, so a Ctrl-C meant for this script does not reach it
    # (cleanup stops it). Not a group leader here, so setsid execs in place and
    # $! is pgtether's own pid.
    setsid "$bin" --config "$TMPD/$name.toml" >"$TMPD/$name.log" 2>&1 &
    pid=$!
    printf -v "$3" '%s' "$port"
    printf -v "$4" '%s' "$pid"
    wait_ready "$name" "$port" "$TMPD/$name.log" "$pid" || die "$name not ready"
}

PGT_PORT="" PGTN_PORT="" PGT1_PORT="" PGTU_PORT="" PGTB_PORT=""
has_target pgtether && start_pgtether pgtether true PGT_PORT PGT_PID
has_target pgtether_notrack && start_pgtether pgtether_notrack false PGTN_PORT PGTN_PID
has_target pgtether_1w && start_pgtether pgtether_1w true PGT1_PORT PGT1_PID 1
has_target pgtether_unnamed && start_pgtether pgtether_unnamed true PGTU_PORT PGTU_PID 0 true
has_target pgtether_base && start_pgtether pgtether_base true PGTB_PORT PGTB_PID
# Two one-thread processes sharing a port (the kernel spreads connections between them), each
# with half the pool: what one process per core, sharing nothing, costs. Both run in one session:
# with the kernel's autogroup scheduling (sched_autogroup_enabled) every session is a group that
# gets an equal share of a busy CPU, so two sessions would get the pooler twice the share
# PgBouncer's single session gets, and starve pgbench into cheaper, larger batches.
if has_target pgtether_peers; then
    PEERS_SIZE=$((MAIN_POOL_SIZE / 2))
    free_port PGTP_PORT
    start_pgtether pgtether_peers true PGTP_PORT PGTP_PID 1 false $((MAIN_POOL_SIZE - PEERS_SIZE)) "$PGTP_PORT" defer
    start_pgtether pgtether_peers2 true PGTP_PORT PGTP2_PID 1 false "$PEERS_SIZE" "$PGTP_PORT" defer
    rm -f "$TMPD/pgtether_peers.pid" "$TMPD/pgtether_peers2.pid"
    # shellcheck disable=SC2016
    setsid bash -c 'for n in pgtether_peers pgtether_peers2; do
            "$0" --config "$1/$n.toml" >"$1/$n.log" 2>&1 & echo $! >"$1/$n.pid"
        done; wait' "$PGTETHER_BIN" "$TMPD" &
    for _ in $(seq 1 50); do [[ -s $TMPD/pgtether_peers2.pid ]] && break; sleep 0.1; done
    PGTP_PID=$(<"$TMPD/pgtether_peers.pid") PGTP2_PID=$(<"$TMPD/pgtether_peers2.pid")
    wait_ready pgtether_peers "$PGTP_PORT" "$TMPD/pgtether_peers.log" "$PGTP_PID" || die "pgtether_peers not ready"
    wait_ready pgtether_peers2 "$PGTP_PORT" "$TMPD/pgtether_peers2.log" "$PGTP2_PID" || die "pgtether_peers2 not ready"
fi

# ---------------------------------------------------------------- runs
# clients mode round target pool tps lat_ms p99_ms cpu_us_per_txn sys_us_per_txn
# pgbench_us_per_txn postgres_us_per_txn
RESULTS=$TMPD/results.tsv
: >"$RESULTS"

port_of() {
    case $1 in
        direct) echo "$PG_PORT" ;;
        pgbouncer) echo "$PGB_PORT" ;;
        pgtether) echo "$PGT_PORT" ;;
        pgtether_notrack) echo "$PGTN_PORT" ;;
        pgtether_1w) echo "$PGT1_PORT" ;;
        pgtether_unnamed) echo "$PGTU_PORT" ;;
        pgtether_peers) echo "$PGTP_PORT" ;;
        pgtether_base) echo "$PGTB_PORT" ;;
    esac
}
pid_of() {
    case $1 in
        pgbouncer) echo "$PGB_PID" ;;
        pgtether) echo "$PGT_PID" ;;
        pgtether_notrack) echo "$PGTN_PID" ;;
        pgtether_1w) echo "$PGT1_PID" ;;
        pgtether_unnamed) echo "$PGTU_PID" ;;
        pgtether_peers) echo "$PGTP_PID $PGTP2_PID" ;;
        pgtether_base) echo "$PGTB_PID" ;;
        *) echo "" ;;
    esac
}
# pool_of TARGET MODE: the pool mode a run uses
pool_of() {
    case $1 in
        direct) echo "-" ;;
        pgtether | pgtether_1w | pgtether_unnamed | pgtether_peers | pgtether_base) echo "$POOL_MODE" ;;
        *) if [[ $SESSION_FOR_PREPARED -eq 1 && $2 == prepared ]]; then echo session; else echo "$POOL_MODE"; fi ;;
    esac
}

# p99 of the per-transaction latency (3rd field of pgbench -l logs, in us),
# printed in ms; "NA" when there is no log line
p99_ms() {
    cat "$@" 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n |
        awk '{ v[NR] = $1 }
             END {
                 if (NR == 0) { print "NA"; exit }
                 i = int(NR * 0.99); if (i < NR * 0.99) i++; if (i < 1) i = 1
                 printf "%.3f\n", v[i] / 1000
             }'
}

ROW_FMT='%-8s %-9s %5s %-16s %-16s %10s %8s %8s %11s %11s %11s %11s\n'

# window_sampler MARKS POOLER_PIDS: reads pgbench's --progress=1 reports and passes every line
# on; for each report it appends "<seconds> <tps> <pooler utime stime> <PostgreSQL ticks>
# <pgbench utime stime>" to MARKS. From these the CPU columns cover the steady state only: from
# the first report, when every client has logged in (at 1,000 clients that can take seconds of
# -T), to the last one at most DURATION - 1 seconds in, before any logs out. (A login can cost
# far more than a transaction: PgBouncer 1.18 derives the SCRAM key from a plain-text password
# on every login, about 5 ms of CPU here.)
window_sampler() {
    local marks=$1 pid=$2 line t tps
    while IFS= read -r line; do
        printf '%s\n' "$line"
        [[ $line == progress:* ]] || continue
        t=${line#progress: }
        tps=${t#*s, }
        echo "${t%% s,*} ${tps%% tps*} $(ticks_of "$pid") $(pg_ticks) $(ticks_of "$(<"$marks.pid")")" >>"$marks"
    done
}

# window_cpu MARKS LAST POOLER?: "cpu_us sys_us pgbench_us postgres_us" per transaction between
# the first report and the last one at most LAST seconds in (transactions: each later report's
# tps times its interval); nothing when the window is empty.
window_cpu() {
    awk -v last="$2" -v hz="$CLK_TCK" -v pooler="$3" '
        NR == 1 { prev = $1; for (i = 3; i <= 7; i++) b[i] = $i; next }
        $1 <= last + 0.001 { n += $2 * ($1 - prev); prev = $1; for (i = 3; i <= 7; i++) a[i] = $i; ok = 1 }
        END {
            if (!ok || n < 1) exit
            f = 1e6 / hz / n
            if (pooler) printf "%.2f %.2f ", (a[3] - b[3] + a[4] - b[4]) * f, (a[4] - b[4]) * f
            else printf "- - "
            printf "%.2f %.2f\n", (a[6] - b[6] + a[7] - b[7]) * f, (a[5] - b[5]) * f
        }' "$1"
}

run_one() {
    local c=$1 mode=$2 round=$3 target=$4 port pid pool db=app j out txlog
    local tps lat p99 txns cpu_us="-" sys_us="-" bench_us="-" pg_us="-" ok=1 marks last
    port=$(port_of "$target")
    pid=$(pid_of "$target")
    pool=$(pool_of "$target" "$mode")
    [[ $pool == session && $POOL_MODE != session ]] && db=app_session
    case $pool in
        -) ;;
        session) pool+="/$SESSION_POOL_SIZE" ;;
        *) pool+="/$MAIN_POOL_SIZE" ;;
    esac
    local clients=$c
    ((TOGETHER == 1)) && clients=$(((c + 1) / 2))
    j=$THREADS
    ((TOGETHER == 1 && j > 1)) && j=$((j / 2))
    ((clients < j)) && j=$clients
    out=$TMPD/run-$c-$mode-$round-$target.log
    txlog=$TMPD/txlog-$c-$mode-$round-$target
    marks=$TMPD/marks-$c-$mode-$round-$target
    last=$((DURATION - 1))
    : >"$out"
    : >"$marks"
    {
        PGPASSWORD=app PGSSLMODE=$(sslmode_of "$target") pgbench -n "${SCRIPT_ARGS[@]}" -M "$mode" -c "$clients" -j "$j" -T "$DURATION" \
            --progress=1 -l --sampling-rate="$SAMPLING" --log-prefix="$txlog" -h "$(host_of)" -p "$port" -U app "$db" \
            2>&1 >>"$out" &
        echo $! >"$marks.pid"
        wait $!
        echo $? >"$marks.rc"
    } | window_sampler "$marks" "$pid" >>"$out"
    [[ $(<"$marks.rc") == 0 ]] || ok=0
    tps=$(awk '/^tps = / { print $3 }' "$out")
    lat=$(awk '/^latency average = / { print $4 }' "$out")
    txns=$(awk -F': *' '/^number of transactions actually processed:/ { split($2, a, "/"); print a[1] }' "$out")
    p99=$(p99_ms "$txlog".*) || p99=NA
    [[ $KEEP_TMP == 1 ]] || rm -f "$txlog".*
    if [[ $ok -eq 0 || -z $tps || -z $txns ]]; then
        log "pgbench against $target failed (c=$c mode=$mode); log $out:"
        { grep -m 3 -i 'error' "$out" || tail -n 5 "$out"; } >&2
        tps=ERR lat=ERR p99=ERR txns=""  # a run with errors is left out of the medians
    fi
    if [[ -z $lat ]]; then lat=NA; fi
    if [[ -n $txns ]]; then
        read -r cpu_us sys_us bench_us pg_us < <(window_cpu "$marks" "$last" "$pid")
        : "${cpu_us:=-}" "${sys_us:=-}" "${bench_us:=-}" "${pg_us:=-}"
        # Run together, the two targets' transactions share PostgreSQL's CPU time.
        ((TOGETHER == 1)) && pg_us="-"
    fi
    [[ $KEEP_TMP == 1 ]] || rm -f "$marks" "$marks.pid" "$marks.rc"
    local tps_shown=$tps
    [[ $tps == ERR ]] || printf -v tps_shown '%.1f' "$tps"
    # shellcheck disable=SC2059
    printf "$ROW_FMT" "$c" "$mode" "$round" "$target" "$pool" "$tps_shown" "$lat" "$p99" "$cpu_us" "$sys_us" \
        "$bench_us" "$pg_us"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$mode" "$round" "$target" "$pool" \
        "$tps" "$lat" "$p99" "$cpu_us" "$sys_us" "$bench_us" "$pg_us" >>"$RESULTS"
}

echo
[[ $CONNECT == 1 ]] && echo "CONNECT=1 (pgbench -C): every transaction is a new connection, login and logout included"
echo "pgbench -b $SCRIPT -n -T $DURATION -j $THREADS -l --sampling-rate=$SAMPLING, scale $SCALE, $ROUNDS round(s)"
[[ $TLS == 1 ]] && echo "clients reach the poolers over TLS (sslmode=require, self-signed P-256 certificate); direct runs are plain"
[[ $UNIX == 1 ]] && echo "clients reach every target over its Unix-domain socket"
[[ $UPSTREAM_UNIX == 1 ]] && echo "the poolers reach PostgreSQL over its Unix-domain socket"
echo "pool mode $POOL_MODE, pool size $MAIN_POOL_SIZE (session pools: $SESSION_POOL_SIZE);" \
    "-M prepared: pgbouncer and pgtether_notrack in session mode" \
    "$([[ $SESSION_FOR_PREPARED -eq 1 ]] && echo "(app_session)" || echo "(not needed)")"
echo "pool = pool mode/size used; lat_ms = mean latency; p99_ms = 99th percentile of per-transaction latency"
echo "CPU us/txn = pooler process utime+stime / transactions, from pgbench's first progress report" \
    "to its last (logins and logouts left out);" \
    "sys_us/txn = its stime part (kernel: socket system calls, wakeups);" \
    "pgbench_us, postgres_us = CPU per transaction of pgbench and of all PostgreSQL processes, same window"
if [[ $TOGETHER == 1 ]]; then
    echo "TOGETHER=1: pgtether and pgtether_base run at the same time, each with half of the clients" \
        "and of pgbench's threads (postgres_us is not split between them)"
else
    echo "targets run in the order given in odd rounds, reversed in even ones"
fi
echo
# shellcheck disable=SC2059
printf "$ROW_FMT" clients mode round target pool tps lat_ms p99_ms cpu_us/txn sys_us/txn pgbench_us postgres_us
# Even rounds run the targets in reverse, so no target always follows the same one (a direct
# run at 1,000 clients leaves PostgreSQL ending 1,000 backends, for example).
REVERSED=""
for t in $TARGETS; do REVERSED="$t $REVERSED"; done
# An unmeasured run per target first: the first measured round would otherwise also pay for
# the pooler's and PostgreSQL's first touch of memory (buffers, tasks, caches) at this load.
warm_up() {
    local c=$1 mode=$2 target=$3 db=app j=$THREADS
    [[ $(pool_of "$target" "$mode") == session && $POOL_MODE != session ]] && db=app_session
    ((c < j)) && j=$c
    PGPASSWORD=app PGSSLMODE=$(sslmode_of "$target") pgbench -n "${SCRIPT_ARGS[@]}" -M "$mode" -c "$c" -j "$j" -T "$WARMUP" \
        -h "$(host_of)" -p "$(port_of "$target")" -U app "$db" >/dev/null 2>&1 ||
        log "warm-up against $target failed (c=$c mode=$mode)"
}

for c in $CLIENTS; do
    for mode in $MODES; do
        if ((WARMUP > 0)); then
            for target in $TARGETS; do warm_up "$c" "$mode" "$target"; done
        fi
        for round in $(seq 1 "$ROUNDS"); do
            order=$TARGETS
            ((round % 2 == 0)) && order=$REVERSED
            # TOGETHER=1: all at once, started in the round's order (the one started first came
            # out about 1.5% behind in runs of one build against itself).
            pids=""
            for target in $order; do
                if [[ $TOGETHER == 1 ]]; then
                    run_one "$c" "$mode" "$round" "$target" &
                    pids+=" $!"
                else
                    run_one "$c" "$mode" "$round" "$target"
                fi
            done
            # shellcheck disable=SC2086
            [[ -z $pids ]] || wait $pids
        done
    done
done

# ---------------------------------------------------------------- summary
LOAD_END=$(cat /proc/loadavg)
echo
echo "Summary (median over $ROUNDS round(s))"
awk -F'\t' -v targets="$TARGETS" '
function median(key,    n, i, j, v, tmp) {
    n = cnt[key]
    if (n == 0) return "NA"
    for (i = 1; i <= n; i++) v[i] = vals[key, i]
    for (i = 2; i <= n; i++) { tmp = v[i]; for (j = i - 1; j >= 1 && v[j] > tmp; j--) v[j + 1] = v[j]; v[j + 1] = tmp }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function add(key, x) { if (x ~ /^[0-9.]+$/) vals[key, ++cnt[key]] = x + 0 }
function fmt(x, p) { return (x == "NA") ? "-" : sprintf(p, x) }
function ratio(a, b) { return (a == "NA" || b == "NA" || b == 0) ? "-" : sprintf("%.3f", a / b) }
function has(t) { return (" " targets " ") ~ (" " t " ") }
# the ratio line of another pgtether target against PgBouncer, when both ran
function vs_pgbouncer(g, gp, t) {
    if (!(has(t) && has("pgbouncer"))) return
    printf "%-8s %-9s ratio %s/pgbouncer: tps %s, cpu_us/txn %s, machine us/txn %s\n",
        gp[1], gp[2], t,
        ratio(m_tps[g, t], m_tps[g, "pgbouncer"]),
        ratio(m_cpu[g, t], m_cpu[g, "pgbouncer"]),
        ratio(machine(g, t), machine(g, "pgbouncer"))
}
# pooler + pgbench + PostgreSQL CPU per transaction: what a transaction costs the machine
function machine(g, t) {
    if (m_cpu[g, t] == "NA" || m_bench[g, t] == "NA" || m_pg[g, t] == "NA") return "NA"
    return m_cpu[g, t] + m_bench[g, t] + m_pg[g, t]
}
{
    g = $1 SUBSEP $2
    if (!(g in seen)) { seen[g] = 1; order[++ng] = g }
    pool[g, $4] = $5
    add(g SUBSEP $4 SUBSEP "tps", $6)
    add(g SUBSEP $4 SUBSEP "lat", $7)
    add(g SUBSEP $4 SUBSEP "p99", $8)
    add(g SUBSEP $4 SUBSEP "cpu", $9)
    add(g SUBSEP $4 SUBSEP "sys", $10)
    add(g SUBSEP $4 SUBSEP "bench", $11)
    add(g SUBSEP $4 SUBSEP "pg", $12)
}
END {
    nt = split(targets, T, " ")
    row = "%-8s %-9s %-16s %-16s %10s %8s %8s %11s %11s %11s %11s\n"
    printf row, "clients", "mode", "target", "pool", "tps", "lat_ms", "p99_ms", "cpu_us/txn", "sys_us/txn",
        "pgbench_us", "postgres_us"
    for (k = 1; k <= ng; k++) {
        g = order[k]; split(g, gp, SUBSEP)
        for (i = 1; i <= nt; i++) {
            t = T[i]
            m_tps[g, t] = median(g SUBSEP t SUBSEP "tps")
            m_lat[g, t] = median(g SUBSEP t SUBSEP "lat")
            m_p99[g, t] = median(g SUBSEP t SUBSEP "p99")
            m_cpu[g, t] = median(g SUBSEP t SUBSEP "cpu")
            m_sys[g, t] = median(g SUBSEP t SUBSEP "sys")
            m_bench[g, t] = median(g SUBSEP t SUBSEP "bench")
            m_pg[g, t] = median(g SUBSEP t SUBSEP "pg")
            printf row, gp[1], gp[2], t, pool[g, t], fmt(m_tps[g, t], "%.1f"), fmt(m_lat[g, t], "%.3f"),
                fmt(m_p99[g, t], "%.3f"), fmt(m_cpu[g, t], "%.2f"), fmt(m_sys[g, t], "%.2f"),
                fmt(m_bench[g, t], "%.2f"), fmt(m_pg[g, t], "%.2f")
        }
        if (has("pgtether") && has("pgbouncer"))
            # floor: the system time of pgtether over the whole CPU of PgBouncer, the cpu ratio
            # pgtether would have with no user time at all (README, Performance).
            printf "%-8s %-9s ratio pgtether/pgbouncer: tps %s, cpu_us/txn %s (sys_us/txn %s, floor %s), machine us/txn %s\n",
                gp[1], gp[2],
                ratio(m_tps[g, "pgtether"], m_tps[g, "pgbouncer"]),
                ratio(m_cpu[g, "pgtether"], m_cpu[g, "pgbouncer"]),
                ratio(m_sys[g, "pgtether"], m_sys[g, "pgbouncer"]),
                ratio(m_sys[g, "pgtether"], m_cpu[g, "pgbouncer"]),
                ratio(machine(g, "pgtether"), machine(g, "pgbouncer"))
        vs_pgbouncer(g, gp, "pgtether_unnamed")
        vs_pgbouncer(g, gp, "pgtether_peers")
        vs_pgbouncer(g, gp, "pgtether_base")
        if (has("pgtether") && has("pgtether_base"))
            printf "%-8s %-9s ratio pgtether/pgtether_base (this build vs BASE_BIN): tps %s, cpu_us/txn %s\n",
                gp[1], gp[2],
                ratio(m_tps[g, "pgtether"], m_tps[g, "pgtether_base"]),
                ratio(m_cpu[g, "pgtether"], m_cpu[g, "pgtether_base"])
        if (has("pgtether") && has("pgtether_1w"))
            printf "%-8s %-9s ratio pgtether/pgtether_1w (2 vs 1 worker threads): tps %s, cpu_us/txn %s\n",
                gp[1], gp[2],
                ratio(m_tps[g, "pgtether"], m_tps[g, "pgtether_1w"]),
                ratio(m_cpu[g, "pgtether"], m_cpu[g, "pgtether_1w"])
        if (has("pgtether") && has("pgtether_notrack"))
            printf "%-8s %-9s ratio pgtether/pgtether_notrack (tracking cost): tps %s, cpu_us/txn %s, p99 %s\n",
                gp[1], gp[2],
                ratio(m_tps[g, "pgtether"], m_tps[g, "pgtether_notrack"]),
                ratio(m_cpu[g, "pgtether"], m_cpu[g, "pgtether_notrack"]),
                ratio(m_p99[g, "pgtether"], m_p99[g, "pgtether_notrack"])
    }
    if (!(has("pgtether") && has("pgtether_notrack"))) exit
    printf "\nTracking cost (medians; on = pgtether, off = pgtether_notrack; ratio = on/off)\n"
    row = "%-8s %-9s %-16s %-16s %10s %10s %6s %8s %8s %6s %8s %8s %6s\n"
    printf row, "clients", "mode", "pool_on", "pool_off", "tps_on", "tps_off", "ratio",
        "cpu_on", "cpu_off", "ratio", "p99_on", "p99_off", "ratio"
    for (k = 1; k <= ng; k++) {
        g = order[k]; split(g, gp, SUBSEP)
        on = g SUBSEP "pgtether"; off = g SUBSEP "pgtether_notrack"
        printf row, gp[1], gp[2], pool[on], pool[off],
            fmt(m_tps[on], "%.1f"), fmt(m_tps[off], "%.1f"), ratio(m_tps[on], m_tps[off]),
            fmt(m_cpu[on], "%.2f"), fmt(m_cpu[off], "%.2f"), ratio(m_cpu[on], m_cpu[off]),
            fmt(m_p99[on], "%.3f"), fmt(m_p99[off], "%.3f"), ratio(m_p99[on], m_p99[off])
    }
}' "$RESULTS"
echo
echo "loadavg at start: $LOAD_START"
echo "loadavg at end:   $LOAD_END"
if [[ -n ${RESULTS_OUT:-} ]]; then
    cp "$RESULTS" "$RESULTS_OUT"
    echo "raw results copied to $RESULTS_OUT"
fi
