#!/usr/bin/env bash
# Soak test (issue 11 item 6; not part of CI): a coordinator with pg_peerpool and three peers on
# 127.0.0.1, two of them behind t/FaultProxy.pm proxies, under a mixed load (pool_query,
# parallel_query, parallel_query_rows, registry changes, pool_check_health) while random faults
# are injected (delay, freeze+thaw, FIN, RST, kill at the n-th message, garbage type byte,
# refuse, slow connect). Prints requests, errors by SQLSTATE and kind, the pool manager's RSS and
# descriptors at start and end, restarts, and the peers' sessions at the end. Exit status 0 when
# the invariants held (no pool manager restart, no crash, no session idle in transaction, none
# above max_connections, every node back after the faults, no hung call).
#
# It builds nothing: pg_peerpool must be installed for PG_CONFIG (make install PG_CONFIG=...).
#
#   DURATION=60 PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config bash bench/soak.sh
#
# Environment: DURATION (seconds of load, default 1800), PG_CONFIG, SOAK_CLIENTS (default 4),
# SOAK_SEED, SOAK_PORT_BASE (default 46000; ports 46000-46999 only), SOAK_FAULT_GAP (mean
# seconds between faults, default 3), SOAK_KEEP=1 (keep the work directory even on success).
# As root, the servers and the driver run as postgres (initdb refuses root). The work directory
# (servers, their logs, the proxies' logs) is kept when the run fails.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"
export DURATION=${DURATION:-1800}

LIB=$("$PG_CONFIG" --pkglibdir)
[ -f "$LIB/pg_peerpool.so" ] || { echo "soak: pg_peerpool.so not in $LIB; install it first" >&2; exit 1; }
command -v timeout >/dev/null || { echo "soak: needs timeout (coreutils)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pg_peerpool_soak.XXXXXX")
[ "$(id -u)" = 0 ] && chown "$TEST_USER" "$WORK"

# On any exit: stop every postmaster the driver started and left behind (the driver stops them
# itself; this covers a driver that was killed). Only pids named by postmaster.pid files in our
# own directory, and only if that process is a postgres whose data directory is ours.
cleanup() {
    local rc=$? f pid i
    for f in "$WORK"/*/postmaster.pid; do
        [ -f "$f" ] || continue
        pid=$(head -n 1 "$f")
        if [ -n "$pid" ] && [ -d "/proc/$pid" ] &&
            tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$(dirname "$f")"; then
            echo "soak: stopping postmaster $pid ($(dirname "$f"))"
            kill -INT "$pid" 2>/dev/null || true
            for i in $(seq 1 300); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
            [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [ "$rc" = 0 ] && [ "${SOAK_KEEP:-}" != 1 ]; then
        rm -rf "$WORK"
    else
        echo "soak: work directory kept: $WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_test_user env PG_CONFIG="$PG_CONFIG" perl -I "$SRC/t" "$SRC/bench/soak.pl" "$WORK"
