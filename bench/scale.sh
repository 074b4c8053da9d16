#!/usr/bin/env bash
# Scale benchmark (SPEC sections 7 and 9): 1,000 nodes with min_connections = 1, added in one
# statement, spread over 10 peers, on a coordinator started with the stock Debian soft file
# limit (1024). Measures the time until all are healthy and the pool manager's CPU while idle
# with 5 s checks, and writes docs/benchmarks-scale.md. Run by `make bench`, or alone:
#   bash bench/scale.sh [nodes] [idle_seconds]
# Needs the extension installed (make install). Servers listen on loopback only; every server
# this script starts, it stops.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"
NODES=${1:-1000}
IDLE_S=${2:-30}
PEERS=10
OUT=${SCALE_OUT:-$SRC/docs/benchmarks-scale.md}

bench_servers_init pg_peerpool_scale immediate
start() { # name port extra-conf soft-nofile
    local d=$DIR/$1
    as_test_user cp -a "$DIR/template" "$d"
    printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n%s\n" \
        "$2" "$DIR" "$3" | as_test_user tee -a "$d/postgresql.conf" >/dev/null
    as_test_user bash -c "ulimit -Sn $4 && exec '$PG_BINDIR/pg_ctl' -D '$d' -l '$DIR/$1.log' -w start" >/dev/null
    STARTED+=("$d")
}
psql_c() { as_test_user "$PG_BINDIR/psql" -X -q -At -h 127.0.0.1 -p "$COORD_PORT" -d postgres "$@"; }

ports=()
per_peer=$(( NODES / PEERS + 20 ))
for i in $(seq 1 $PEERS); do
    p=$(free_port)
    start "peer$i" "$p" "max_connections = $per_peer
shared_buffers = 16MB" 4096
    ports+=("$p")
done

# The floor, side by side: the same number of sessions opened by plain libpq clients, no
# pg_peerpool (the load driver, one process per peer, one thread and session each, one
# `SELECT 1` per session), in waves of 64 connection attempts at once -- the pool manager's own
# cap (kMaxConnecting). On a small machine that also runs every peer, forking and starting the
# backends bounds how soon any pooler can have them all. (Sessions of a wave close before the
# next starts: fewer backends alive than in the real run, more exits.)
DRIVER=$SRC/bench/driver
[ -x "$DRIVER" ] || build_bench_tool driver
FLOOR_WAVE=64
f0=$(date +%s.%N)
opened=0
while [ "$opened" -lt "$NODES" ]; do
    wave=$(( NODES - opened < FLOOR_WAVE ? NODES - opened : FLOOR_WAVE ))
    floor_pids=()
    for i in $(seq 0 $(( PEERS - 1 ))); do
        n=$(( wave / PEERS + (i < wave % PEERS ? 1 : 0) ))
        [ "$n" -gt 0 ] || continue
        as_test_user "$DRIVER" \
            --conninfo "host=127.0.0.1 port=${ports[$i]} dbname=postgres user=$TEST_USER" \
            --clients "$n" --iterations 1 --sql 'SELECT 1' --label floor \
            >/dev/null 2>>"$DIR/floor.err" &
        floor_pids+=($!)
    done
    for pid in "${floor_pids[@]}"; do wait "$pid" || true; done
    opened=$(( opened + wave ))
done
floor_s=$(echo "$(date +%s.%N) - $f0" | bc -l)
floor_errors=$(grep -c 'error:' "$DIR/floor.err" || true)

COORD_PORT=$(free_port)
start coord "$COORD_PORT" "shared_preload_libraries = 'pg_peerpool'
peerpool.max_nodes = $(( NODES + 10 ))
peerpool.health_check_interval = '5s'" 1024
psql_c -c 'CREATE EXTENSION pg_peerpool'
PM_PID=$(psql_c -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_peerpool pool manager'")
SOFT=$(awk '/Max open files/ {print $4}' /proc/$PM_PID/limits)

port_list=$(IFS=,; echo "${ports[*]}")
t0=$(date +%s.%N)
psql_c -c "SELECT count(peerpool.pool_add_node('n' || g,
               format('host=127.0.0.1 port=%s dbname=postgres user=%s',
                      (ARRAY[$port_list])[1 + g % $PEERS], current_user),
               min_connections => 1, max_connections => 2))
             FROM generate_series(1, $NODES) g" >/dev/null
t_added=$(date +%s.%N)
healthy=0
deadline=$(( $(date +%s) + 120 ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    healthy=$(psql_c -c "SELECT count(*) FILTER (WHERE state = 'healthy') FROM peerpool.node_health")
    [ "$healthy" -ge "$NODES" ] && break
    if [ -n "${SCALE_VERBOSE:-}" ] && [ $(( $(date +%s) % 5 )) = 0 ]; then
        psql_c -c "SELECT round(extract(epoch FROM now()) - $t0) || ' s: ' ||
                          (SELECT string_agg(state || ' ' || n, ', ') FROM
                             (SELECT state, count(*) n FROM peerpool.node_health GROUP BY 1) s) ||
                          '; connections ' || (SELECT sum(total) || ' (' || sum(idle) || ' idle)'
                                                 FROM peerpool.pool_stats)"
        sleep 0.9
    fi
    sleep 0.1
done
t_healthy=$(date +%s.%N)
add_s=$(echo "$t_added - $t0" | bc -l)
healthy_s=$(echo "$t_healthy - $t0" | bc -l)
conns=$(psql_c -c "SELECT sum(total) FROM peerpool.pool_stats")
problems=$(psql_c -c "SELECT string_agg(DISTINCT last_error, '; ') FROM peerpool.node_health WHERE state <> 'healthy'")

# Idle CPU: utime + stime of the pool manager over IDLE_S seconds (USER_HZ = 100).
# Split into user and kernel time: with the peers on this host, sending a check on loopback
# also runs the peer's TCP receive and the wake-up of its backend in our process's kernel time.
utime() { awk '{print $14}' /proc/$PM_PID/stat; }
stime() { awk '{print $15}' /proc/$PM_PID/stat; }
sleep 5
u0=$(utime); s0=$(stime); w0=$(date +%s.%N)
sleep "$IDLE_S"
u1=$(utime); s1=$(stime); w1=$(date +%s.%N)
cpu_pct=$(echo "100 * ($u1 - $u0 + $s1 - $s0) / 100 / ($w1 - $w0)" | bc -l)
cpu_user_pct=$(echo "100 * ($u1 - $u0) / 100 / ($w1 - $w0)" | bc -l)
cpu_sys_pct=$(echo "100 * ($s1 - $s0) / 100 / ($w1 - $w0)" | bc -l)
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$PM_PID/status)
fds=$(ls /proc/$PM_PID/fd | wc -l)

# The idle-CPU floor, side by side: the same checks (the very query string the pool manager
# sends, read from a peer's pg_stat_activity), at the same rate and on the same 100 ms grid,
# from a minimal epoll loop with one libpq connection per node and nothing else
# (bench/checkloop.cpp), after the coordinator has stopped and its sessions are gone.
psql_peer() { as_test_user "$PG_BINDIR/psql" -X -q -At -h 127.0.0.1 -p "$1" -d postgres -c "$2"; }
check_sql=$(psql_peer "${ports[0]}" "SELECT query FROM pg_stat_activity
    WHERE application_name = 'pg_peerpool' AND query LIKE 'SET LOCAL statement_timeout%' LIMIT 1")
as_test_user "$PG_BINDIR/pg_ctl" -D "$DIR/coord" -m fast stop >/dev/null
for p in "${ports[@]}"; do
    for _ in $(seq 1 300); do
        [ "$(psql_peer "$p" "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_peerpool'")" = 0 ] && break
        sleep 0.1
    done
done
CHECKLOOP=$SRC/bench/checkloop
[ -x "$CHECKLOOP" ] || build_bench_tool checkloop
floor_cpu="not measured (no check query seen on the peer)"
if [ -n "$check_sql" ]; then
    cl_args=()
    for p in "${ports[@]}"; do
        cl_args+=(--conninfo "host=127.0.0.1 port=$p dbname=postgres user=$TEST_USER application_name=checkloop")
    done
    # The checks due within one 100 ms grid slot share a wake-up, as in the pool manager.
    cl_out=$(as_test_user "$CHECKLOOP" "${cl_args[@]}" --nodes "$NODES" --interval-ms 5000 \
        --grid-ms 100 --sql "$check_sql" --seconds "$IDLE_S" 2>&1 || true)
    cl_user=$(echo "$cl_out" | sed -n 's/.*cpu_user_pct=\([0-9.]*\).*/\1/p')
    cl_sys=$(echo "$cl_out" | sed -n 's/.*cpu_sys_pct=\([0-9.]*\).*/\1/p')
    cl_checks=$(echo "$cl_out" | sed -n 's/.*checks=\([0-9]*\).*/\1/p')
    cl_failed=$(echo "$cl_out" | sed -n 's/.*failed=\([0-9]*\).*/\1/p')
    if [ -n "$cl_user" ] && [ -n "$cl_sys" ]; then
        cl_total=$(echo "$cl_user + $cl_sys" | bc -l)
        floor_cpu=$(printf '%.2f %% of a core (user %.2f %%, kernel %.2f %%; %s checks, %s failed)' \
            "$cl_total" "$cl_user" "$cl_sys" "$cl_checks" "$cl_failed")
        floor_cpu_ratio=$(printf '%.1f×' "$(echo "$cpu_pct / $cl_total" | bc -l)")
    else
        floor_cpu="failed: $cl_out"
    fi
fi

{
    echo "# Scale: $NODES nodes"
    echo
    echo "Generated by \`bash bench/scale.sh $NODES $IDLE_S\` (part of \`make bench\`) on $(nproc) CPUs, $(date -u +%Y-%m-%d)."
    echo "$NODES nodes with \`min_connections = 1\` over $PEERS local peers, added in one statement;"
    echo "the coordinator was started with a soft descriptor limit of 1024 (Debian's default);"
    echo "the pool manager raised its own to $SOFT."
    echo
    echo "| measure | value | target (SPEC §9) |"
    echo "|---|---|---|"
    printf '| the statement adding %d nodes | %.2f s | |\n' "$NODES" "$add_s"
    printf '| all %d nodes healthy after | %.2f s (%d healthy) | ≤ 10 s |\n' "$NODES" "$healthy_s" "$healthy"
    printf '| the floor: %d sessions opened by plain libpq clients, 64 attempts at a time, one `SELECT 1` each, no pg_peerpool | %.2f s (%s errors) | |\n' "$NODES" "$floor_s" "$floor_errors"
    printf '| pg_peerpool / floor | %.1f× | |\n' "$(echo "$healthy_s / $floor_s" | bc -l)"
    printf '| pooled connections | %s | |\n' "$conns"
    printf '| pool manager CPU while idle (5 s checks, %d s) | %.2f %% of a core (user %.2f %%, kernel %.2f %%) | ≤ 1 %% |\n' "$IDLE_S" "$cpu_pct" "$cpu_user_pct" "$cpu_sys_pct"
    printf '| the floor: the same checks at the same rate, on the same 100 ms grid, from a minimal libpq epoll loop, no pg_peerpool (%d s) | %s | |\n' "$IDLE_S" "$floor_cpu"
    [ -n "${floor_cpu_ratio:-}" ] && printf '| pool manager CPU / floor | %s | |\n' "$floor_cpu_ratio"
    printf '| pool manager RSS / open descriptors | %d MB / %d | |\n' "$(( rss_kb / 1024 ))" "$fds"
    if [ -n "$problems" ]; then printf '\nNodes not healthy at the end: %s\n' "$problems"; fi
    # For the SPEC table of `make bench` (bench/report.py).
    floor_json=null
    [ -n "${cl_total:-}" ] && floor_json=$(printf '%.2f' "$cl_total")
    printf '\n<!-- summary {"nodes": %d, "healthy": %d, "healthy_s": %.2f, "floor_s": %.2f, "cpu_pct": %.2f, "floor_cpu_pct": %s} -->\n' \
        "$NODES" "$healthy" "$healthy_s" "$floor_s" "$cpu_pct" "$floor_json"
} | tee "$OUT"
