#!/usr/bin/env bash
# `make bench`: the performance targets of SPEC §9, measured side by side in one run.
#
# Starts a throwaway fleet on 127.0.0.1 in a scratch directory (as the postgres user when run
# as root): a coordinator that preloads pg_peerpool and has dblink and postgres_fdw, and
# $BENCH_PEERS small peers (20 by default). Builds the load driver (bench/driver.cpp), runs
#   1. one-node SELECT 1 latency, 1 client: pool_query, dblink (persistent and per call),
#      postgres_fdw, and libpq straight to the peer;
#   2. the same five with 8 and 32 clients, with pool_query's pool capped at 4 connections,
#      while the peer's pg_stat_activity is sampled every 50 ms;
#   2b. (bench/reset.sh, servers of its own, after the rest) pool_query with the default
#      peerpool.reset_query (DISCARD ALL) and with '' (1 client: p50; 8 and 32 clients:
#      throughput), pgbouncer's same reset beside it, the peer sharing the CPUs and on its own;
#   3. parallel_query fan-out over 1, 2, 5, 10, 20 nodes against pool_query to each node in turn;
#   3b. large results: parallel_query_rows and parallel_query over 3 nodes x 100k rows x 6 columns
#      against one pool_query returning the same 300k rows from one node;
#   4. a registry of 100 nodes: the time to add one, and to read the views;
#   5. when strace is installed: the system calls per pool_query call of the calling backend and
#      of the pool manager (how many wake-ups a call costs);
# writes raw results under bench/results/ and regenerates docs/benchmarks.md and its SVG plots
# (bench/report.py), then stops every server it started.
#
# It uses the pg_peerpool already installed in the PostgreSQL 15 that PG_CONFIG names (default:
# the system's, as in scripts/lib.sh; `make install`, `make test` or `make demo` put it there)
# and builds nothing else.
#
# Knobs (environment): BENCH_SECONDS (measured window of each latency/throughput run, default 5;
# the latency phase does 3 interleaved rounds of it),
# BENCH_FANOUT_CALLS (calls per fan-out point, default 20), BENCH_LARGE_CALLS (calls per
# large-result method, default 5), BENCH_PEERS (default 20; the fan-out uses the node counts
# that fit).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"

BENCH_SECONDS=${BENCH_SECONDS:-5}
BENCH_FANOUT_CALLS=${BENCH_FANOUT_CALLS:-20}
BENCH_PEERS=${BENCH_PEERS:-20}
BENCH_LARGE_CALLS=${BENCH_LARGE_CALLS:-5}
LATENCY_ROUNDS=3          # phase 1 runs every method this many times, interleaved
POOL_MAX=4                # max_connections of every node's pool (SPEC §9: pools of 4)
DRIVER_TIMEOUT=180        # no single driver run may take longer (a hang is a finding)
RESULTS=$SRC/bench/results
BEGAN=$(date +%s)
LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

say() { echo "bench: $*"; }
die() { echo "bench: $*" >&2; exit 1; }

# ---- prerequisites: nothing is installed or built into the system here -----------------------
PKGLIB=$("$PG_CONFIG" --pkglibdir)
SHARE=$("$PG_CONFIG" --sharedir)
[ -f "$PKGLIB/pg_peerpool.so" ] && [ -f "$SHARE/extension/pg_peerpool.control" ] ||
    die "pg_peerpool is not installed in $PKGLIB; run 'make install' (or 'make test') first"
for ext in dblink postgres_fdw; do
    [ -f "$SHARE/extension/$ext.control" ] ||
        die "contrib extension $ext is missing; install postgresql-contrib-15"
done
INCLUDEDIR=$("$PG_CONFIG" --includedir)
[ -f "$INCLUDEDIR/libpq-fe.h" ] || die "libpq-fe.h not found in $INCLUDEDIR; install libpq-dev"
command -v g++ >/dev/null || die "g++ is needed to build the load driver"
command -v python3 >/dev/null || die "python3 is needed to write the report"
SO_MD5=$(md5sum "$PKGLIB/pg_peerpool.so" | cut -c1-12) # the code the coordinator will load
if [ -f "$SRC/pg_peerpool.so" ] && ! cmp -s "$SRC/pg_peerpool.so" "$PKGLIB/pg_peerpool.so"; then
    say "warning: the installed pg_peerpool.so differs from the one built in this tree"
fi

# ---- the load driver ----------------------------------------------------------------------------
DRIVER=$SRC/bench/driver
build_bench_tool driver
say "built bench/driver"

rm -rf "$RESULTS" # the results of one run only
mkdir -p "$RESULTS"
RUNS=$RESULTS/runs.jsonl

# ---- the fleet ----------------------------------------------------------------------------------
DIR=$(mktemp -d "${TMPDIR:-/tmp}/pg_peerpool-bench.XXXXXX")
[ "$(id -u)" = 0 ] && chown "$TEST_USER" "$DIR"
STARTED=()
cleanup() {
    local rc=$?
    for d in "${STARTED[@]}"; do
        as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -m fast stop >/dev/null 2>&1 || true
    done
    mkdir -p "$RESULTS/logs"
    cp "$DIR"/*.log "$RESULTS/logs/" 2>/dev/null || true
    as_root rm -rf "$DIR"
    say "stopped ${#STARTED[@]} servers and removed $DIR (server logs in bench/results/logs)"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORTS=()
candidate=55500
while [ ${#PORTS[@]} -lt $((BENCH_PEERS + 1)) ]; do
    port_free "$candidate" && PORTS+=("$candidate")
    candidate=$((candidate + 1))
    [ $candidate -lt 56500 ] || die "not enough free loopback ports"
done
COORD_PORT=${PORTS[0]}

# One initdb; every server is a copy of it with its own settings appended (later lines win).
as_test_user "$PG_BINDIR/initdb" -D "$DIR/template" -A trust -U "$TEST_USER" >/dev/null
as_test_user tee -a "$DIR/template/postgresql.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
logging_collector = off
shared_buffers = 16MB
max_connections = 50
CONF

start_server() { # name port extra-conf
    local d=$DIR/$1
    as_test_user cp -a "$DIR/template" "$d"
    printf 'port = %s\n%s\n' "$2" "$3" | as_test_user tee -a "$d/postgresql.conf" >/dev/null
    if ! as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -l "$DIR/$1.log" -w start >/dev/null; then
        echo "bench: $1 did not start:"; tail -n 20 "$DIR/$1.log"; return 1
    fi
    STARTED+=("$d")
}

start_server coordinator "$COORD_PORT" "shared_preload_libraries = 'pg_peerpool'
shared_buffers = 128MB
max_connections = 100
peerpool.max_nodes = 128"
for i in $(seq 1 "$BENCH_PEERS"); do
    start_server "peer$i" "${PORTS[$i]}" ""
done
say "started a coordinator (port $COORD_PORT) and $BENCH_PEERS peers (ports ${PORTS[1]}-${PORTS[$BENCH_PEERS]})"

PEER1_PORT=${PORTS[1]}
peer_conninfo() { echo "host=127.0.0.1 port=${PORTS[$1]} dbname=postgres user=$TEST_USER"; }
PEER1=$(peer_conninfo 1)
# Clients of the coordinator: a statement may not hang the benchmark.
COORD="host=127.0.0.1 port=$COORD_PORT dbname=postgres user=$TEST_USER options='-c statement_timeout=60000'"
psql_at() { # port sql...
    local port=$1; shift
    "$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$TEST_USER" -d postgres "$@"
}

psql_at "$PEER1_PORT" -c "CREATE VIEW one AS SELECT 1 AS x"
{
    echo "CREATE EXTENSION pg_peerpool; CREATE EXTENSION dblink; CREATE EXTENSION postgres_fdw;"
    for i in $(seq 1 "$BENCH_PEERS"); do
        echo "SELECT peerpool.pool_add_node('peer$i', '$(peer_conninfo "$i")', max_connections => $POOL_MAX);"
    done
    echo "CREATE SERVER peer1_fdw FOREIGN DATA WRAPPER postgres_fdw
              OPTIONS (host '127.0.0.1', port '$PEER1_PORT', dbname 'postgres');
          CREATE USER MAPPING FOR CURRENT_USER SERVER peer1_fdw OPTIONS (user '$TEST_USER');
          CREATE FOREIGN TABLE one_ft (x int) SERVER peer1_fdw
              OPTIONS (schema_name 'public', table_name 'one');"
} | psql_at "$COORD_PORT" >/dev/null

ok=
for _ in $(seq 1 600); do
    if [ "$(psql_at "$COORD_PORT" -At -c "SELECT count(*) FROM peerpool.node_health WHERE state = 'healthy'")" = "$BENCH_PEERS" ]; then
        ok=1; break
    fi
    sleep 0.05
done
[ -n "$ok" ] || { psql_at "$COORD_PORT" -c "SELECT node_name, state, last_error FROM peerpool.node_health"; die "the peers did not all become healthy within 30 s"; }
say "all $BENCH_PEERS nodes healthy in the coordinator's pools (max_connections $POOL_MAX each)"

# ---- the measurements -----------------------------------------------------------------------
# CPU accounting around each run: the pool manager's own CPU time (percent of one CPU) and how
# busy the whole machine was (percent of all CPUs). Other work on the machine shows up there.
PM_PID=$(psql_at "$COORD_PORT" -At -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_peerpool pool manager'")
CLK_TCK=$(getconf CLK_TCK)
machine_ticks() { awk '/^cpu / {busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6}' /proc/stat; }

# run_driver label tag... -- driver-args...: one driver run, appended to runs.jsonl.
run_driver() {
    local label=$1; shift
    local tags=()
    while [ "$1" != -- ]; do tags+=(--tag "$1"); shift; done
    shift
    local out rc=0 pm0 pm1 m0 m1 t0 t1 tag_json="" t
    for t in "${tags[@]}"; do
        [ "$t" = --tag ] || tag_json+="${tag_json:+, }\"${t%%=*}\": \"${t#*=}\""
    done
    pm0=$(proc_ticks "$PM_PID"); m0=$(machine_ticks); t0=$(date +%s.%N)
    out=$(timeout "$DRIVER_TIMEOUT" "$DRIVER" --label "$label" "${tags[@]}" "$@") || rc=$?
    pm1=$(proc_ticks "$PM_PID"); m1=$(machine_ticks); t1=$(date +%s.%N)
    if [ $rc -ne 0 ]; then
        echo "{\"label\": \"$label\", \"tags\": {$tag_json}, \"driver_failed\": $rc}" >>"$RUNS"
        say "driver run '$label' failed (exit $rc; 124 = hung past ${DRIVER_TIMEOUT}s)"
        return 0
    fi
    local cpu
    cpu=$(echo "$pm0 $pm1 $m0 $m1 $t0 $t1 $CLK_TCK" | awk '{
        printf "\"pool_manager_cpu_pct\": %.1f, \"machine_busy_pct\": %.1f",
               100 * ($2 - $1) / $9 / ($8 - $7), ($6 > $4) ? 100 * ($5 - $3) / ($6 - $4) : 0 }')
    echo "${out%\}}, $cpu}" >>"$RUNS"
}

# The five ways to run SELECT 1 on peer1: name | conninfo | setup | sql
DBLINK_PEER1="host=127.0.0.1 port=$PEER1_PORT dbname=postgres user=$TEST_USER"
method_args() {
    case $1 in
    pool_query) echo "$COORD"; echo ""; echo "SELECT * FROM peerpool.pool_query('SELECT 1', 'peer1') AS t(x int)" ;;
    dblink_persistent) echo "$COORD"; echo "SELECT dblink_connect('c', '$DBLINK_PEER1')"; echo "SELECT * FROM dblink('c', 'SELECT 1') AS t(x int)" ;;
    dblink_per_call) echo "$COORD"; echo ""; echo "SELECT * FROM dblink('$DBLINK_PEER1', 'SELECT 1') AS t(x int)" ;;
    postgres_fdw) echo "$COORD"; echo ""; echo "SELECT x FROM one_ft" ;;
    libpq_direct) echo "$PEER1"; echo ""; echo "SELECT 1" ;;
    esac
}
METHODS="pool_query dblink_persistent dblink_per_call postgres_fdw libpq_direct"
# Pooled sessions and all other client sessions on peer1 (the sampler's own excluded).
SAMPLE_SQL="SELECT count(*) FILTER (WHERE application_name = 'pg_peerpool'),
                   count(*) FILTER (WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                                      AND application_name <> 'pg_peerpool')
              FROM pg_stat_activity"

run_method() { # phase method clients [round]
    local phase=$1 method=$2 clients=$3 round=${4:-1} conninfo setup sql warmup=50
    { read -r conninfo; read -r setup; read -r sql; } < <(method_args "$method")
    [ "$method" = dblink_per_call ] && warmup=5
    local setup_args=()
    [ -n "$setup" ] && setup_args=(--setup "$setup")
    local latfile=latencies_${phase}_${method}_c${clients}_r${round}.txt
    run_driver "$method x$clients" "phase=$phase" "method=$method" "clients=$clients" \
        "round=$round" "latencies=$latfile" -- \
        --conninfo "$conninfo" --sql "$sql" "${setup_args[@]}" --expect 1 \
        --clients "$clients" --duration "$BENCH_SECONDS" --warmup "$warmup" \
        --sample-conninfo "$PEER1" --sample-sql "$SAMPLE_SQL" --sample-ms 50 \
        --latencies "$RESULTS/$latfile"
}

# Interleaved rounds, so that a disturbance of the machine hits every method alike.
say "1/5 one-node SELECT 1 latency, 1 client: $LATENCY_ROUNDS rounds of ${BENCH_SECONDS}s per method"
for r in $(seq 1 "$LATENCY_ROUNDS"); do
    for m in $METHODS; do run_method latency "$m" 1 "$r"; done
done

say "2/5 throughput with 8 and 32 clients, ${BENCH_SECONDS}s per run (pool_query: pool of $POOL_MAX on peer1)"
psql_at "$COORD_PORT" -At -c "SELECT peerpool.pool_reset_stats()" >/dev/null
for c in 8 32; do
    for m in $METHODS; do run_method throughput "$m" "$c"; done
done
psql_at "$COORD_PORT" -At -c "SELECT row_to_json(s) FROM peerpool.pool_stats s WHERE node_name = 'peer1'" \
    >"$RESULTS/pool_stats_peer1.json"

say "3/5 fan-out: parallel_query vs pool_query to each node in turn, $BENCH_FANOUT_CALLS calls per point"
node_array() { # n -> ARRAY['peer1',...,'peerN']
    local a="" i
    for i in $(seq 1 "$1"); do a+="${a:+,}'peer$i'"; done
    echo "ARRAY[$a]"
}
for n in 1 2 5 10 20; do
    [ "$n" -le "$BENCH_PEERS" ] || continue
    arr=$(node_array "$n")
    for w in sleep select1; do
        if [ $w = sleep ]; then q='SELECT pg_sleep(0.05)'; else q='SELECT 1'; fi
        run_driver "parallel_query $w n=$n" phase=fanout mode=parallel "workload=$w" "nodes=$n" -- \
            --conninfo "$COORD" --clients 1 --iterations "$BENCH_FANOUT_CALLS" --warmup 2 \
            --expect "$n" \
            --sql "SELECT count(*) FILTER (WHERE success) FROM peerpool.parallel_query('$q', $arr)"
        run_driver "sequential $w n=$n" phase=fanout mode=sequential "workload=$w" "nodes=$n" -- \
            --conninfo "$COORD" --clients 1 --iterations "$BENCH_FANOUT_CALLS" --warmup 2 \
            --expect "$n" \
            --sql "SELECT count(*) FROM unnest($arr) AS n(node)
                   CROSS JOIN LATERAL peerpool.pool_query('$q', n.node) AS t(x text)"
    done
done

# Large results (SPEC §9): 3 nodes x 100k rows x 6 columns through parallel_query_rows and
# parallel_query (jsonb), against one pool_query returning the same 300k rows from one node.
if [ "$BENCH_PEERS" -ge 3 ]; then
    say "3b/5 large results: 3 x 100k rows, $BENCH_LARGE_CALLS calls per method"
    LARGE_TABLE="SELECT g AS id, g * 2 AS n2, md5(g::text) AS h, now() AS ts, g % 2 = 0 AS b,
                        round(g::numeric / 7, 4) AS num FROM generate_series(1, 100000) g"
    for i in 1 2 3; do
        psql_at "${PORTS[$i]}" -q -c "CREATE TABLE big AS $LARGE_TABLE" \
            -c "CREATE TABLE big3 AS SELECT big.* FROM big, generate_series(1, 3)" -c "VACUUM ANALYZE"
    done
    LARGE_COLS="id int, n2 int, h text, ts timestamptz, b boolean, num numeric"
    run_driver "pool_query 300k rows" phase=large method=pool_query_300k -- \
        --conninfo "$COORD" --clients 1 --iterations "$BENCH_LARGE_CALLS" --warmup 1 --expect 300000 \
        --sql "SELECT count(*) FROM peerpool.pool_query('SELECT * FROM big3', 'peer1') AS t($LARGE_COLS)"
    run_driver "parallel_query_rows 3 x 100k rows" phase=large method=parallel_query_rows -- \
        --conninfo "$COORD" --clients 1 --iterations "$BENCH_LARGE_CALLS" --warmup 1 --expect 300000 \
        --sql "SELECT count(*) FROM peerpool.parallel_query_rows('SELECT * FROM big',
               ARRAY['peer1', 'peer2', 'peer3']) AS t(node text, $LARGE_COLS)"
    run_driver "parallel_query 3 x 100k rows" phase=large method=parallel_query -- \
        --conninfo "$COORD" --clients 1 --iterations "$BENCH_LARGE_CALLS" --warmup 1 --expect 300000 \
        --sql "SELECT sum(jsonb_array_length(result)) FROM peerpool.parallel_query('SELECT * FROM big',
               ARRAY['peer1', 'peer2', 'peer3'])"
    run_driver "parallel_query 1 x 100k rows" phase=large method=parallel_query_1 -- \
        --conninfo "$COORD" --clients 1 --iterations "$BENCH_LARGE_CALLS" --warmup 1 --expect 100000 \
        --sql "SELECT sum(jsonb_array_length(result)) FROM peerpool.parallel_query('SELECT * FROM big',
               ARRAY['peer1'])"
    for i in 1 2 3; do
        psql_at "${PORTS[$i]}" -q -c "DROP TABLE big, big3"
    done
fi

say "4/5 a registry of 100 nodes: adding one, reading the views"
EXTRA_SQL=$RESULTS/registry100.sql
{
    echo "\\timing on"
    for i in $(seq $((BENCH_PEERS + 1)) 100); do
        echo "SELECT peerpool.pool_add_node('node$i', '$(peer_conninfo $(( (i - 1) % BENCH_PEERS + 1 )))', max_connections => $POOL_MAX);"
    done
    echo "\\timing off"
    # From the client's view of the commit until the pool manager shows the node healthy.
    echo "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
            WHILE NOT EXISTS (SELECT 1 FROM peerpool.node_health
                               WHERE node_name = 'node100' AND state = 'healthy') LOOP
                IF clock_timestamp() - t0 > interval '10 s' THEN
                    RAISE EXCEPTION 'node100 not healthy after 10 s';
                END IF;
                PERFORM pg_sleep(0.001);
            END LOOP;
            RAISE NOTICE 'healthy_after_ms=%', round((extract(epoch FROM clock_timestamp() - t0) * 1000)::numeric, 3);
          END \$\$;"
} >"$EXTRA_SQL"
psql_at "$COORD_PORT" -At -f "$EXTRA_SQL" >"$RESULTS/registry100.out" 2>&1 ||
    say "registering 100 nodes failed: see bench/results/registry100.out"
for _ in $(seq 1 600); do
    [ "$(psql_at "$COORD_PORT" -At -c "SELECT count(*) FROM peerpool.node_health WHERE state = 'healthy'")" = 100 ] && break
    sleep 0.05
done
VIEW_CALLS=200
{
    grep -o 'Time: [0-9.]*' "$RESULTS/registry100.out" | awk '{print $2}' | tail -n 1 | sed 's/^/add_ms=/'
    grep -o 'Time: [0-9.]*' "$RESULTS/registry100.out" | awk '{print $2}' | sort -n |
        awk '{v[NR] = $1} END {if (NR) print "add_median_ms=" v[int((NR + 1) / 2)]}'
    grep -o 'healthy_after_ms=[0-9.]*' "$RESULTS/registry100.out" || true
    echo "nodes=$(psql_at "$COORD_PORT" -At -c "SELECT count(*) FROM peerpool.nodes")"
    echo "healthy=$(psql_at "$COORD_PORT" -At -c "SELECT count(*) FROM peerpool.node_health WHERE state = 'healthy'")"
    echo "view_calls=$VIEW_CALLS"
    for v in nodes node_health pool_stats events; do
        echo "rows_$v=$(psql_at "$COORD_PORT" -At -c "SELECT count(*) FROM peerpool.$v")"
    done
} >"$RESULTS/registry100.txt"
for v in nodes node_health pool_stats events; do
    run_driver "view $v (100 nodes)" phase=registry100 "view=$v" -- \
        --conninfo "$COORD" --clients 1 --iterations "$VIEW_CALLS" --warmup 10 \
        --sql "SELECT * FROM peerpool.$v"
done

# Where a pool_query call spends its wake-ups: strace -c on the calling backend and on the pool
# manager for a few seconds of a one-client pool_query loop; pool_stats counts the calls meanwhile.
if command -v strace >/dev/null; then
    say "5/5 system calls per pool_query call (strace -c)"
    "$DRIVER" --label syscalls --conninfo "$COORD" --clients 1 --duration 6 --warmup 50 \
        --sql "SELECT * FROM peerpool.pool_query('SELECT 1', 'peer1') AS t(x int)" >/dev/null 2>&1 &
    LOOP_PID=$!
    sleep 1
    BACKEND_PID=$(psql_at "$COORD_PORT" -At -c "SELECT pid FROM pg_stat_activity
        WHERE query LIKE '%pool_query(%' AND pid <> pg_backend_pid() LIMIT 1")
    queries() { psql_at "$COORD_PORT" -At -c "SELECT queries FROM peerpool.pool_stats WHERE node_name = 'peer1'"; }
    q0=$(queries)
    timeout -s INT 3 strace -c -p "$BACKEND_PID" -o "$RESULTS/strace_backend.txt" 2>/dev/null &
    S1=$!
    timeout -s INT 3 strace -c -p "$PM_PID" -o "$RESULTS/strace_pool_manager.txt" 2>/dev/null &
    S2=$!
    wait $S1 $S2 || true
    q1=$(queries)
    wait $LOOP_PID || true
    echo "calls=$((q1 - q0))" >"$RESULTS/strace_calls.txt"
fi

# ---- the environment, a health check of the servers, and the report ---------------------------
{
    echo "loadavg_before=$LOADAVG_BEFORE"
    echo "tree_commit=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "installed_so_md5=$SO_MD5"
    echo "latency_rounds=$LATENCY_ROUNDS"
    echo "nproc=$(nproc)"
    echo "memory_mb=$(awk '/MemTotal/ {printf "%d", $2/1024}' /proc/meminfo)"
    echo "cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "kernel=$(uname -sr)"
    echo "server_version=$(psql_at "$COORD_PORT" -At -c 'SHOW server_version')"
    echo "extension_version=$(psql_at "$COORD_PORT" -At -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_peerpool'")"
    echo "libpq_version=$("$PG_CONFIG" --version)"
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "peers=$BENCH_PEERS"
    echo "pool_max=$POOL_MAX"
    echo "seconds_per_run=$BENCH_SECONDS"
    echo "fanout_calls=$BENCH_FANOUT_CALLS"
    echo "large_calls=$BENCH_LARGE_CALLS"
    echo "pool_manager_pid_start=$PM_PID"
    echo "pool_manager_pid_end=$(psql_at "$COORD_PORT" -At -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_peerpool pool manager'")"
    echo "crashes=$(cat "$DIR"/*.log | grep -c -E 'terminated by signal|PANIC' || true)"
    echo "runtime_s=$(($(date +%s) - BEGAN))"
} >"$RESULTS/env.txt"

# The phases below start servers of their own: this fleet stops first, so that its health
# checks do not run beside them.
for d in "${STARTED[@]}"; do
    as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -m fast stop >/dev/null 2>&1 || true
done

# Phase 2b: the cost of session hygiene (SPEC section 9), pool_query with and without the
# default reset_query and pgbouncer's same reset beside it, with the peer sharing the CPUs and
# on a CPU of its own; writes docs/benchmarks-reset.md, which the report includes.
say "2b/5 reset_query cost (bench/reset.sh): DISCARD ALL against none, 1, 8 and 32 clients, pgbouncer beside it"
RESET_RESULTS=$RESULTS bash "$SRC/bench/reset.sh" "$BENCH_SECONDS" || say "reset phase failed"

# Phase 5: 1,000 nodes (SPEC sections 7 and 9), on servers of its own; writes
# docs/benchmarks-scale.md, which the report includes.
bash "$SRC/bench/scale.sh" "${BENCH_SCALE_NODES:-1000}" "${BENCH_SCALE_IDLE_S:-30}" || say "scale phase failed"

# The whole run, the phases on servers of their own included (read_kv keeps the last value).
echo "runtime_s=$(($(date +%s) - BEGAN))" >>"$RESULTS/env.txt"
python3 "$SRC/bench/report.py" "$RESULTS" "$SRC/docs"
say "wrote bench/results/ and docs/benchmarks.md in $(($(date +%s) - BEGAN)) s"
