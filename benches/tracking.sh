#!/usr/bin/env bash
# Cost of session-state tracking: pgtether with track_session_state = true
# (pgtether) against the same binary with it off (pgtether_notrack), for
# pgbench -M simple, extended and prepared. A thin wrapper around compare.sh;
# see benches/README.md. Every compare.sh variable can be overridden, e.g.
#   ROUNDS=5 DURATION=20 benches/tracking.sh
#   SCRIPT=tpcb-like benches/tracking.sh
# With -M prepared, pgtether_notrack runs in session mode (without tracking,
# named prepared statements cannot follow clients in transaction mode), so that
# row compares tracking in transaction mode with plain session pooling.
set -euo pipefail
export TARGETS=${TARGETS:-"pgtether pgtether_notrack"}
export MODES=${MODES:-"simple extended prepared"}
export CLIENTS=${CLIENTS:-100}
export POOL_SIZE=${POOL_SIZE:-20}
export ROUNDS=${ROUNDS:-3}
exec "$(dirname "${BASH_SOURCE[0]}")/compare.sh" "$@"
