#!/usr/bin/env bash
# `make demo`: a throwaway local fleet. Installs missing dependencies, builds and installs
# pg_peerpool, starts a coordinator and two peers on 127.0.0.1 in a scratch directory (as the
# postgres user when run as root), registers the peers, shows what the pool manager sees, and
# stops every server it started.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"

bash "$SRC/scripts/deps.sh"
BUILD=$(scratch_copy "$SRC")
(cd "$BUILD" && as_test_user make -j2 PG_CONFIG="$PG_CONFIG" >/dev/null &&
    as_root make install PG_CONFIG="$PG_CONFIG" >/dev/null)
echo "demo: pg_peerpool built and installed"

DIR=$(mktemp -d "${TMPDIR:-/tmp}/pg_peerpool-demo.XXXXXX")
[ "$(id -u)" = 0 ] && chown "$TEST_USER" "$DIR"
STARTED=()
cleanup() {
    for d in "${STARTED[@]}"; do
        as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -m fast stop >/dev/null 2>&1 || true
    done
    as_root rm -rf "$DIR" "$BUILD"
    echo "demo: stopped ${#STARTED[@]} servers and removed $DIR"
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Three free loopback ports (no subshells: the search must remember where it stopped).
PORTS=()
candidate=55400
while [ ${#PORTS[@]} -lt 3 ]; do
    port_free "$candidate" && PORTS+=("$candidate")
    candidate=$((candidate + 1))
done

start_server() { # name port extra-conf
    local d=$DIR/$1
    as_test_user "$PG_BINDIR/initdb" -D "$d" -A trust -U "$TEST_USER" >/dev/null
    as_test_user tee -a "$d/postgresql.conf" >/dev/null <<CONF
port = $2
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
logging_collector = off
$3
CONF
    if ! as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -l "$DIR/$1.log" -w start >/dev/null; then
        echo "demo: $1 did not start:"; tail -n 20 "$DIR/$1.log"; return 1
    fi
    STARTED+=("$d")
    echo "demo: started $1 on 127.0.0.1:$2"
}

COORD_PORT=${PORTS[0]}; PEER1_PORT=${PORTS[1]}; PEER2_PORT=${PORTS[2]}
start_server coordinator "$COORD_PORT" "shared_preload_libraries = 'pg_peerpool'
peerpool.health_check_interval = '1s'
peerpool.reconnect_backoff_initial = '250ms'"
start_server peer1 "$PEER1_PORT" ""
start_server peer2 "$PEER2_PORT" ""

psql_c() { as_test_user "$PG_BINDIR/psql" -X -q -h 127.0.0.1 -p "$COORD_PORT" -d postgres "$@"; }

psql_c <<SQL
CREATE EXTENSION pg_peerpool;
SELECT peerpool.pool_add_node('peer1', 'host=127.0.0.1 port=$PEER1_PORT dbname=postgres user=$TEST_USER');
SELECT peerpool.pool_add_node('peer2', 'host=127.0.0.1 port=$PEER2_PORT dbname=postgres user=$TEST_USER password=not-shown', max_connections => 4);
SQL

# Wait (bounded) until both nodes are healthy.
wait_for() { # sql-returning-boolean
    for _ in $(seq 1 200); do
        [ "$(psql_c -At -c "$1")" = t ] && return 0
        sleep 0.05
    done
    echo "demo: timed out waiting for: $1"; return 1
}
wait_for "SELECT count(*) = 2 FROM peerpool.node_health WHERE state = 'healthy'"

echo; echo "== peerpool.nodes (configuration; passwords masked)"
psql_c -c "SELECT * FROM peerpool.nodes ORDER BY node_name"
echo "== peerpool.node_health (live state from shared memory)"
psql_c -c "SELECT node_name, state, role, round(latency_ms::numeric, 2) AS latency_ms, consecutive_failures, last_check FROM peerpool.node_health ORDER BY node_name"
echo "== peerpool.pool_stats"
psql_c -c "SELECT node_name, state, total, active, idle, created, closed FROM peerpool.pool_stats ORDER BY node_name"
echo "== the pool manager, and its sessions on peer1"
psql_c -c "SELECT pid, backend_type, datname FROM pg_stat_activity WHERE backend_type = 'pg_peerpool pool manager'"
echo "== peerpool.pool_manager (is anybody checking? node_health.stale says so on every row)"
psql_c -c "SELECT pid, state, started_at, round(heartbeat_age_ms::numeric) AS heartbeat_age_ms, restarts FROM peerpool.pool_manager"
as_test_user "$PG_BINDIR/psql" -X -q -h 127.0.0.1 -p "$PEER1_PORT" -d postgres \
    -c "SELECT pid, application_name, state FROM pg_stat_activity WHERE application_name = 'pg_peerpool'"

echo "== parallel_query: one question to every node at once"
psql_c -c "SELECT node_name, success, result, error, round(elapsed_ms::numeric, 2) AS elapsed_ms
             FROM peerpool.parallel_query('SELECT current_setting(''port'')::int AS port, pg_is_in_recovery() AS standby, pg_database_size(''postgres'') AS bytes')"
echo "== pool_query: one node, chosen by target and peerpool.load_balance (round_robin)"
psql_c -c "SELECT * FROM peerpool.pool_query('SELECT current_setting(''port'') AS port', 'read') AS t(port text)
           UNION ALL
           SELECT * FROM peerpool.pool_query('SELECT current_setting(''port'') AS port', 'read') AS t(port text)"

echo "== a transition: stopping peer2 in immediate mode, then starting it again"
as_test_user "$PG_BINDIR/pg_ctl" -D "$DIR/peer2" -m immediate stop >/dev/null
wait_for "SELECT state <> 'healthy' FROM peerpool.node_health WHERE node_name = 'peer2'"
psql_c -c "SELECT node_name, state, retry_attempt, next_retry_at, last_error FROM peerpool.node_health WHERE node_name = 'peer2'"
echo "== parallel_query with peer2 down: partial failure, the healthy node answers at once"
psql_c -c "SELECT node_name, success, result, left(error, 70) AS error, round(elapsed_ms::numeric, 2) AS elapsed_ms
             FROM peerpool.parallel_query('SELECT pg_sleep(0.2), 1 AS ok')"
as_test_user "$PG_BINDIR/pg_ctl" -D "$DIR/peer2" -l "$DIR/peer2.log" -w start >/dev/null
wait_for "SELECT state = 'healthy' FROM peerpool.node_health WHERE node_name = 'peer2'"
echo "== peerpool.events for peer2 (newest first)"
psql_c -c "SELECT at, from_state, to_state, left(reason, 90) AS reason FROM peerpool.events WHERE node_name = 'peer2'"
