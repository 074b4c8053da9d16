#!/usr/bin/env bash
# The cost of session hygiene (SPEC sections 5, 6 and 9): pool_query('SELECT 1') with the
# default peerpool.reset_query (DISCARD ALL after every call) against reset_query = '' (none),
# and beside it the natural alternative doing the same thing: pgbouncer in transaction mode
# with server_reset_query = 'DISCARD ALL' and server_reset_query_always = 1 against no reset.
# Pools of 4 connections to one peer; 1 client (p50, rounds interleaved), 8 and 32 clients
# (throughput). Each setting is measured twice in the same run:
#   shared  every process on every CPU (the peer competes with the coordinator for the CPUs);
#   split   the peer on a CPU of its own and everything else on the others (taskset), as when
#           the peer is another host: what the reset costs the coordinator's side.
# Writes docs/benchmarks-reset.md (which `make bench` includes as its section 2b) and, when
# RESET_RESULTS names a directory, reset_runs.jsonl there. Run by `make bench`, or alone:
#   bash bench/reset.sh [seconds_per_run]
# Needs the extension installed (make install) and bench/driver (built here if missing);
# pgbouncer is optional (scripts/deps.sh installs it for the tests). Servers listen on
# loopback only; every server this script starts, it stops.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"
SECS=${1:-5}
ROUNDS_1=${RESET_ROUNDS_1:-7} # 1 client: interleaved rounds per setting
ROUNDS_8=${RESET_ROUNDS_8:-3} # 8 clients
POOL=4
OUT=${RESET_OUT:-$SRC/docs/benchmarks-reset.md}

bench_servers_init pg_peerpool_reset fast
bouncers=()
bench_cleanup_first() {
    local p
    for p in "${bouncers[@]}"; do kill "$p" 2>/dev/null || true; done
}
start() { # name port extra-conf
    local d=$DIR/$1
    as_test_user cp -a "$DIR/template" "$d"
    printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nmax_connections = 100\n%s\n" \
        "$2" "$DIR" "$3" | as_test_user tee -a "$d/postgresql.conf" >/dev/null
    as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -l "$DIR/$1.log" -w start >/dev/null
    STARTED+=("$d")
}
PEER_PORT=$(free_port)
start peer "$PEER_PORT" ""
COORD_PORT=$(free_port)
start coord "$COORD_PORT" "shared_preload_libraries = 'pg_peerpool'"
psql_c() { "$PG_BINDIR/psql" -X -q -At -h 127.0.0.1 -p "$COORD_PORT" -U "$TEST_USER" -d postgres "$@"; }
PEER_CONNINFO="host=127.0.0.1 port=$PEER_PORT dbname=postgres user=$TEST_USER"
psql_c -c "CREATE EXTENSION pg_peerpool" \
    -c "SELECT peerpool.pool_add_node('peer1', '$PEER_CONNINFO', max_connections => $POOL)" >/dev/null
for _ in $(seq 1 300); do
    [ "$(psql_c -c "SELECT state FROM peerpool.node_health WHERE node_name = 'peer1'")" = healthy ] && break
    sleep 0.1
done
PM_PID=$(psql_c -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_peerpool pool manager'")
COORD_PM=$(head -1 "$DIR/coord/postmaster.pid")
PEER_PM=$(head -1 "$DIR/peer/postmaster.pid")

# Two pgbouncers in front of the same peer, one resetting after every transaction.
BOUNCER=$(command -v pgbouncer || true)
PGB_RESET_PORT="" PGB_NONE_PORT=""
start_bouncer() { # name port reset-lines
    local ini=$DIR/$1.ini
    as_test_user tee "$ini" >/dev/null <<INI
[databases]
postgres = host=127.0.0.1 port=$PEER_PORT dbname=postgres user=$TEST_USER
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir =
auth_type = trust
auth_file = $DIR/users.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 100
logfile = $DIR/$1.log
pidfile = $DIR/$1.pid
$3
INI
    as_test_user "$BOUNCER" -d "$ini" >/dev/null
    for _ in $(seq 1 50); do [ -s "$DIR/$1.pid" ] && break; sleep 0.1; done
    bouncers+=("$(cat "$DIR/$1.pid")")
}
if [ -n "$BOUNCER" ]; then
    echo "\"$TEST_USER\" \"\"" | as_test_user tee "$DIR/users.txt" >/dev/null
    PGB_RESET_PORT=$(free_port)
    start_bouncer pgb_reset "$PGB_RESET_PORT" "server_reset_query = DISCARD ALL
server_reset_query_always = 1"
    PGB_NONE_PORT=$(free_port)
    start_bouncer pgb_none "$PGB_NONE_PORT" "server_reset_query ="
fi

DRIVER=$SRC/bench/driver
[ -x "$DRIVER" ] || build_bench_tool driver

# Placement. Processes forked later (backends, pooled sessions) inherit their parent's CPUs.
NCPU=$(nproc)
LAST=$((NCPU - 1))
DRV_CPUS=""
pin() { # cpu-list pid...
    local cpus=$1 p c; shift
    for p in "$@"; do
        taskset -a -pc "$cpus" "$p" >/dev/null 2>&1 || true
        for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do taskset -a -pc "$cpus" "$c" >/dev/null 2>&1 || true; done
    done
}
place() { # shared|split
    if [ "$1" = split ]; then
        pin "$LAST" "$PEER_PM"
        pin "0-$((LAST - 1))" "$COORD_PM" "${bouncers[@]}"
        DRV_CPUS="0-$((LAST - 1))"
    else
        pin "0-$LAST" "$PEER_PM" "$COORD_PM" "${bouncers[@]}"
        DRV_CPUS="0-$LAST"
    fi
}

set_reset() { # default|none
    if [ "$1" = none ]; then
        psql_c -c "ALTER SYSTEM SET peerpool.reset_query = ''" >/dev/null
    else
        psql_c -c "ALTER SYSTEM RESET peerpool.reset_query" >/dev/null
    fi
    psql_c -c "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5 # the pool manager rereads its configuration at its next wake-up
}

# CPU time (clock ticks) of all the peer's processes (proc_ticks: scripts/lib.sh).
peer_ticks() {
    local s=0 p
    for p in $PEER_PM $(ps -o pid= --ppid "$PEER_PM"); do s=$((s + $(proc_ticks "$p"))); done
    echo $s
}
RUNS=$DIR/runs.jsonl
run() { # placement method clients round
    local conninfo sql pooler_pid
    case $2 in
    pq_*) conninfo="host=127.0.0.1 port=$COORD_PORT dbname=postgres user=$TEST_USER"
          sql="SELECT * FROM peerpool.pool_query('SELECT 1', 'peer1') AS t(x int)"
          pooler_pid=$PM_PID ;;
    pgb_reset) conninfo="host=127.0.0.1 port=$PGB_RESET_PORT dbname=postgres user=$TEST_USER"
          sql="SELECT 1"; pooler_pid=${bouncers[0]} ;;
    pgb_none) conninfo="host=127.0.0.1 port=$PGB_NONE_PORT dbname=postgres user=$TEST_USER"
          sql="SELECT 1"; pooler_pid=${bouncers[1]} ;;
    esac
    local q0 p0 q1 p1 out
    q0=$(proc_ticks "$pooler_pid"); p0=$(peer_ticks)
    out=$(timeout 120 taskset -c "$DRV_CPUS" "$DRIVER" --label "$2" --conninfo "$conninfo" \
        --sql "$sql" --expect 1 --clients "$3" --duration "$SECS" --warmup 50 2>/dev/null) ||
        out='{"driver_failed": 1}'
    q1=$(proc_ticks "$pooler_pid"); p1=$(peer_ticks)
    echo "${out%\}}, \"placement\": \"$1\", \"method\": \"$2\", \"clients\": $3, \"round\": $4, \"pooler_ticks\": $((q1 - q0)), \"peer_ticks\": $((p1 - p0))}" >>"$RUNS"
    echo "reset: $1 $2 x$3 round $4: $(echo "$out" | sed -n 's/.*"qps": \([0-9.]*\).*"p50_ms": \([0-9.]*\).*/qps \1, p50 \2 ms/p')"
}

placements=shared
[ "$NCPU" -ge 2 ] && placements="shared split"
methods="pq_default pq_none"
[ -n "$BOUNCER" ] && methods="$methods pgb_reset pgb_none"
for placement in $placements; do
    place "$placement"
    for c in 1 8 32; do
        rounds=1
        [ "$c" = 1 ] && rounds=$ROUNDS_1
        [ "$c" = 8 ] && rounds=$ROUNDS_8
        for r in $(seq 1 "$rounds"); do
            for m in $methods; do
                case $m in pq_default) set_reset default ;; pq_none) set_reset none ;; esac
                run "$placement" "$m" "$c" "$r"
            done
        done
    done
done
set_reset default
place shared
[ -n "${RESET_RESULTS:-}" ] && cp "$RUNS" "$RESET_RESULTS/reset_runs.jsonl"

python3 - "$RUNS" "$OUT" "$SECS" "$ROUNDS_1" "$ROUNDS_8" "$POOL" "$NCPU" "$(getconf CLK_TCK)" \
    "$("$BOUNCER" --version 2>/dev/null | head -1)" <<'PY'
import json, statistics, sys, datetime
runs_path, out, secs, r1, r8, pool, ncpu, clk, bouncer = sys.argv[1:10]
clk = float(clk)
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
def sel(pl, m, c):
    return [r for r in runs if r["placement"] == pl and r["method"] == m and r["clients"] == c]
def ok(rs):
    return [r for r in rs if not r.get("driver_failed")]
def med(xs):
    return statistics.median(xs) if xs else None
def p50(pl, m):
    return med([r["p50_ms"] for r in ok(sel(pl, m, 1))])
def rounds_p50(pl, m):
    return [r["p50_ms"] for r in sorted(ok(sel(pl, m, 1)), key=lambda r: r["round"])]
def qps(pl, m, c):
    rs = ok(sel(pl, m, c))
    return statistics.mean([r["qps"] for r in rs]) if rs else None
def errors(pl, m):
    return sum(r.get("errors", 0) + r.get("warmup_errors", 0) for r in sel(pl, m, 1) + sel(pl, m, 8) + sel(pl, m, 32)) + \
        sum(1 for r in sel(pl, m, 1) + sel(pl, m, 8) + sel(pl, m, 32) if r.get("driver_failed"))
def us_per_call(pl, m, c, key):
    rs = ok(sel(pl, m, c))
    calls = sum(r["calls"] for r in rs)
    return 1e6 * sum(r[key] for r in rs) / clk / calls if calls else None
def f_ms(v): return "n/a" if v is None else ("%.3f" % v)
def f_q(v): return "n/a" if v is None else "{:,.0f}".format(v)
def f_r(a, b): return "n/a" if not a or not b else "%.2f" % (a / b)
def cost(a, b): return None if not a or not b else 100.0 * (1 - a / b)
def f_c(v): return "n/a" if v is None else "%.1f %%" % v
def f_us(v): return "n/a" if v is None else "%.0f" % v
placements = [p for p in ("shared", "split") if any(r["placement"] == p for r in runs)]
have_pgb = any(r["method"].startswith("pgb") for r in runs)
L = []
a = L.append
a("# Reset cost: `peerpool.reset_query`")
a("")
a("Generated by `bash bench/reset.sh %s` (part of `make bench`) on %s CPUs, %s. One peer, pools of %s "
  "connections, `SELECT 1`; each run %s s after 50 warm-up calls per client. 1 client: %s rounds per "
  "setting, 8 clients: %s, 32 clients: 1, the settings interleaved within each round."
  % (secs, ncpu, datetime.datetime.utcnow().strftime("%Y-%m-%d"), pool, secs, r1, r8))
a("")
a("- **shared**: every process may run on every CPU, so the peer's backends compete with the "
  "caller, the coordinator's backends and the pool manager.")
a("- **split**: the peer on CPU %d alone, everything else (coordinator, pool manager, poolers, load "
  "driver) on the others, with `taskset`: a peer that is another host, as in a fleet." % (int(ncpu) - 1))
a("")
a("`pool_query` switches `peerpool.reset_query` between `DISCARD ALL` (the default) and `''` with "
  "`ALTER SYSTEM` and a reload before each run. %s" % (
  ("pgbouncer (%s) runs twice in front of the same peer, transaction pooling with "
   "`default_pool_size = %s`: once with `server_reset_query = DISCARD ALL` and "
   "`server_reset_query_always = 1` (the same reset after every transaction), once with no reset; "
   "its clients send `SELECT 1` to it directly." % (bouncer or "pgbouncer", pool)) if have_pgb else
  "pgbouncer is not installed: no comparison."))
a("")
hdr = "| placement | clients | measure | `pool_query` `DISCARD ALL` | `pool_query` no reset | reset ÷ none |"
sep = "|---|---:|---|---:|---:|---:|"
if have_pgb:
    hdr += " pgbouncer `DISCARD ALL` | pgbouncer no reset | reset ÷ none |"
    sep += "---:|---:|---:|"
a(hdr)
a(sep)
summary = {}
for pl in placements:
    pd, pn, bd, bn = p50(pl, "pq_default"), p50(pl, "pq_none"), p50(pl, "pgb_reset"), p50(pl, "pgb_none")
    per_round = [x / y for x, y in zip(rounds_p50(pl, "pq_default"), rounds_p50(pl, "pq_none")) if y]
    row = "| %s | 1 | p50 ms (median of rounds; per-round ratios %s) | %s | %s | **%s** |" % (
        pl, ", ".join("%.2f" % x for x in per_round) or "n/a", f_ms(pd), f_ms(pn), f_r(pd, pn))
    if have_pgb:
        row += " %s | %s | %s |" % (f_ms(bd), f_ms(bn), f_r(bd, bn))
    a(row)
    summary[pl] = {"p50_default": pd, "p50_none": pn, "p50_ratio": pd / pn if pd and pn else None,
                   "pgb_p50_ratio": bd / bn if bd and bn else None}
    for c in (8, 32):
        qd, qn, gd, gn = qps(pl, "pq_default", c), qps(pl, "pq_none", c), qps(pl, "pgb_reset", c), qps(pl, "pgb_none", c)
        row = "| %s | %d | qps (mean of rounds); cost of the reset | %s | %s | %s; **%s** |" % (
            pl, c, f_q(qd), f_q(qn), f_r(qd, qn), f_c(cost(qd, qn)))
        if have_pgb:
            row += " %s | %s | %s; %s |" % (f_q(gd), f_q(gn), f_r(gd, gn), f_c(cost(gd, gn)))
        a(row)
        summary[pl]["qps%d_default" % c], summary[pl]["qps%d_none" % c] = qd, qn
        summary[pl]["cost%d" % c], summary[pl]["pgb_cost%d" % c] = cost(qd, qn), cost(gd, gn)
a("")
a("CPU per call, 8 clients (µs of CPU time per completed call, all rounds):")
a("")
a("| placement | | pool manager, `DISCARD ALL` | pool manager, no reset | the peer's processes, `DISCARD ALL` | the peer's processes, no reset |")
a("|---|---|---:|---:|---:|---:|")
for pl in placements:
    a("| %s | `pool_query` | %s | %s | %s | %s |" % (
        pl, f_us(us_per_call(pl, "pq_default", 8, "pooler_ticks")), f_us(us_per_call(pl, "pq_none", 8, "pooler_ticks")),
        f_us(us_per_call(pl, "pq_default", 8, "peer_ticks")), f_us(us_per_call(pl, "pq_none", 8, "peer_ticks"))))
    if have_pgb:
        a("| %s | pgbouncer (its process) | %s | %s | %s | %s |" % (
            pl, f_us(us_per_call(pl, "pgb_reset", 8, "pooler_ticks")), f_us(us_per_call(pl, "pgb_none", 8, "pooler_ticks")),
            f_us(us_per_call(pl, "pgb_reset", 8, "peer_ticks")), f_us(us_per_call(pl, "pgb_none", 8, "peer_ticks"))))
a("")
errs = {m: sum(errors(pl, m) for pl in placements) for m in ("pq_default", "pq_none", "pgb_reset", "pgb_none")}
a("Errors (all runs): `pool_query` %d / %d%s." % (errs["pq_default"], errs["pq_none"],
  ("; pgbouncer %d / %d" % (errs["pgb_reset"], errs["pgb_none"])) if have_pgb else ""))
a("")
a("<!-- summary %s -->" % json.dumps(summary, sort_keys=True))
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
