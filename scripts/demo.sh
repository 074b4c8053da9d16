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
next_port=55400
free_port() {
    while ! port_free "$next_port"; do next_port=$((next_port + 1)); done
    echo "$next_port"; next_port=$((next_port + 1))
}

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
    as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -l "$DIR/$1.log" -w start >/dev/null
    STARTED+=("$d")
    echo "demo: started $1 on 127.0.0.1:$2"
}

COORD_PORT=$(free_port); PEER1_PORT=$(free_port); PEER2_PORT=$(free_port)
start_server coordinator "$COORD_PORT" "shared_preload_libraries = 'pg_peerpool'
peerpool.health_check_interval = '1s'"
start_server peer1 "$PEER1_PORT" ""
start_server peer2 "$PEER2_PORT" ""

psql_c() { as_test_user "$PG_BINDIR/psql" -X -q -h 127.0.0.1 -p "$COORD_PORT" -d postgres "$@"; }

psql_c <<SQL
CREATE EXTENSION pg_peerpool;
SELECT peerpool.pool_add_node('peer1', 'host=127.0.0.1 port=$PEER1_PORT dbname=postgres user=$TEST_USER');
SELECT peerpool.pool_add_node('peer2', 'host=127.0.0.1 port=$PEER2_PORT dbname=postgres user=$TEST_USER password=not-shown', max_connections => 4);
SQL

# Wait (bounded) until the pool manager has mirrored both nodes into shared memory.
for _ in $(seq 1 100); do
    n=$(psql_c -At -c "SELECT count(*) FROM peerpool.node_health")
    [ "$n" = 2 ] && break
    sleep 0.05
done

echo; echo "== peerpool.nodes (configuration; passwords masked)"
psql_c -c "SELECT * FROM peerpool.nodes ORDER BY node_name"
echo "== peerpool.node_health (live state from shared memory)"
psql_c -c "SELECT node_name, state, role, state_since, consecutive_failures FROM peerpool.node_health ORDER BY node_name"
echo "== the pool manager"
psql_c -c "SELECT pid, backend_type, datname FROM pg_stat_activity WHERE backend_type = 'pg_peerpool pool manager'"
