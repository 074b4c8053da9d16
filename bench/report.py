#!/usr/bin/env python3
"""Writes the report of `make bench` (scripts/bench.sh) from its raw results.

Usage: report.py RESULTS_DIR DOCS_DIR

Reads   RESULTS_DIR/runs.jsonl          one JSON object per load-driver run (bench/driver.cpp)
        RESULTS_DIR/env.txt             key=value: machine, versions, settings of the run
        RESULTS_DIR/registry100.txt     key=value: the 100-node registry measurements
        RESULTS_DIR/pool_stats_peer1.json  peerpool.pool_stats of peer1 after the throughput runs
Writes  RESULTS_DIR/summary.csv         one row per driver run
        DOCS_DIR/benchmarks.md          tables, SPEC section 9 verdicts, explanation
        DOCS_DIR/benchmarks-latency.svg, -throughput.svg, -fanout.svg   plots (hand-made SVG)

Only the standard library: the SVG is written by hand.
"""
import csv
import json
import math
import os
import sys

METHODS = ["pool_query", "dblink_persistent", "dblink_per_call", "postgres_fdw", "libpq_direct"]
METHOD_TEXT = {
    "pool_query": "`pool_query` (pooled, via the pool manager)",
    "dblink_persistent": "dblink, persistent connection",
    "dblink_per_call": "dblink, connecting per call",
    "postgres_fdw": "postgres_fdw foreign table",
    "libpq_direct": "libpq straight to the peer (floor)",
}
METHOD_SHORT = {
    "pool_query": "pool_query",
    "dblink_persistent": "dblink persistent",
    "dblink_per_call": "dblink per call",
    "postgres_fdw": "postgres_fdw",
    "libpq_direct": "libpq direct",
}
COLORS = {
    "pool_query": "#d62728",
    "dblink_persistent": "#1f77b4",
    "dblink_per_call": "#9467bd",
    "postgres_fdw": "#2ca02c",
    "libpq_direct": "#7f7f7f",
}


PLACEMENT_TEXT = {"shared": "peer on the same CPUs", "split": "peer on a CPU of its own"}
# Why the reset costs what it costs, and the cheaper ways tried (issue 8).
RESET_EXPLANATION = (
    "Where the cost comes from: `DISCARD ALL` is one more statement on the remote session after "
    "every call. On the peer it costs what `SELECT 1` does (pgbench, one client on this machine: "
    "0.039 ms against 0.041 ms; the statement itself is cheap, the round trip is not), and the "
    "pooler sends it and reads its answer: one `send` and one `recv` more per call (the CPU table "
    "above: the pool manager's share per call is about pgbouncer's for the same reset). In the "
    "shared placement that work runs on the CPUs the caller needs; with the peer on its own CPU, "
    "only the pooler's part is left on the caller's side. Cheaper ways tried or considered, none "
    "of which keeps every isolation guarantee or gains anything: sending the reset only once the "
    "node has handed out its next call, so that it overlaps the next call's wait on the peer "
    "instead of the caller's own work (built and measured with this script, 7 interleaved rounds: "
    "one-client p50 0.152 ms sent at once, 0.172 ms deferred, 0.114 ms without reset on shared "
    "CPUs; 0.172, 0.190 and 0.201 ms split; so it was dropped); pipelining "
    "the reset behind the caller's query in one write (libpq allows that only in pipeline mode, "
    "which needs the extended protocol and so refuses multi-statement SQL; measured apart with a "
    "libpq client, the pipelined pair cost 66-72 µs of CPU against 64-69 µs as two round trips); "
    "prefixing the next caller's SQL with the reset (`DISCARD ALL` refuses the implicit "
    "transaction of a multi-statement string, and its parts would share the caller's transaction "
    "and be rolled back with a failing call); a cheaper statement (`RESET ALL` misses temporary "
    "tables, locks, prepared statements and LISTEN; SPEC section 6 fixes the default); skipping "
    "the reset when the same caller comes back (SPEC section 5 covers any later call); detecting "
    "a dirty session from the server's ParameterStatus messages or command tags (they miss roles "
    "set by functions, temporary tables, locks and LISTEN); a lazy reset just before the next use "
    "(leaves advisory locks, temporary tables and LISTEN in idle sessions). `reset_query = ''` "
    "remains the opt-out for fleets whose callers are one trust domain."
)


def read_kv(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    out[k] = v
    return out


def read_runs(path):
    runs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    return runs


def find(runs, **tags):
    for r in runs:
        t = r.get("tags", {})
        if all(t.get(k) == str(v) for k, v in tags.items()):
            return r
    return None


def percentile(sorted_vals, p):
    """Nearest rank, as the driver computes it."""
    if not sorted_vals:
        return None
    rank = math.ceil(p / 100.0 * len(sorted_vals))
    return sorted_vals[min(len(sorted_vals), max(rank, 1)) - 1]


def mean_of(rs, key):
    v = [r[key] for r in rs if r.get(key) is not None]
    return sum(v) / len(v) if v else None


def merged_latency(runs, results, method):
    """Phase 1 runs a method in several interleaved rounds: merge their latencies into one run."""
    rs = [r for r in runs if r.get("tags", {}).get("phase") == "latency"
          and r.get("tags", {}).get("method") == method]
    if not rs:
        return None
    bad = [r for r in rs if r.get("driver_failed") is not None]
    if bad:
        return bad[0]
    lat = []
    for r in rs:
        with open(os.path.join(results, r["tags"]["latencies"])) as f:
            lat.extend(float(line) for line in f if line.strip())
    lat.sort()
    wall = sum(r["wall_s"] for r in rs)
    sm = []
    for r in rs:
        for i, v in enumerate(r.get("sample_max") or []):
            if i >= len(sm):
                sm.append(v)
            else:
                sm[i] = max(sm[i], v)
    return {
        "calls": len(lat), "errors": sum(r["errors"] for r in rs),
        "warmup_errors": sum(r.get("warmup_errors", 0) for r in rs), "wall_s": wall,
        "qps": len(lat) / wall if wall else None,
        "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else None, "min_ms": lat[0] if lat else None,
        "max_ms": lat[-1] if lat else None, "sample_max": sm,
        "pool_manager_cpu_pct": mean_of(rs, "pool_manager_cpu_pct"),
        "machine_busy_pct": mean_of(rs, "machine_busy_pct"),
        "rounds_p50": [r.get("p50_ms") for r in sorted(rs, key=lambda r: int(r["tags"].get("round", 1)))],
    }


def included_page(docs, name):
    """A page another script wrote (bench/reset.sh, bench/scale.sh): its lines, and the JSON of
    its `<!-- summary ... -->` line ({} when there is none)."""
    path = os.path.join(docs, name)
    if not os.path.exists(path):
        return None, {}
    lines, summary = [], {}
    with open(path) as f:
        for line in f.read().splitlines():
            if line.startswith("<!-- summary ") and line.endswith(" -->"):
                summary = json.loads(line[len("<!-- summary "):-len(" -->")])
            else:
                lines.append(line)
    return lines, summary


def read_strace(path):
    """Calls per syscall from an `strace -c` summary, or {} when there is none."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            tok = line.split()
            if len(tok) >= 5 and tok[-1] != "total" and tok[3].isdigit():
                try:
                    float(tok[0])
                except ValueError:
                    continue
                out[tok[-1]] = int(tok[3])
    return out


def fmt_ms(v):
    if v is None:
        return "n/a"
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3f" % v


def fmt_ratio(v):
    return "n/a" if v is None else "%.2f" % v


def fmt_qps(v):
    return "n/a" if v is None else "{:,.0f}".format(v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def val(run, key):
    if run is None or run.get("driver_failed") is not None:
        return None
    return run.get(key)


def failed(run):
    """True when a run is missing, hung, or had any error (measured or during warm-up)."""
    return (run is None or run.get("driver_failed") is not None or run.get("errors", 0) > 0
            or run.get("warmup_errors", 0) > 0)


def verdict(ok):
    if ok is None:
        return "**not measured**"
    return "**met**" if ok else "**not met**"


# ---- SVG ---------------------------------------------------------------------------------------

def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Svg:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.parts = []

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", color="#222", rotate=None):
        tr = ' transform="rotate(%d %.1f %.1f)"' % (rotate, x, y) if rotate else ""
        self.add('<text x="%.1f" y="%.1f" font-size="%d" text-anchor="%s" font-weight="%s" '
                 'fill="%s"%s>%s</text>' % (x, y, size, anchor, weight, color, tr, esc(s)))

    def line(self, x1, y1, x2, y2, color="#ccc", width=1, dash=None):
        d = ' stroke-dasharray="%s"' % dash if dash else ""
        self.add('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%s"%s/>'
                 % (x1, y1, x2, y2, color, width, d))

    def rect(self, x, y, w, h, color, opacity=1.0):
        self.add('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" '
                 'fill-opacity="%.2f"/>' % (x, y, max(w, 0), max(h, 0), color, opacity))

    def circle(self, x, y, r, color):
        self.add('<circle cx="%.1f" cy="%.1f" r="%.1f" fill="%s"/>' % (x, y, r, color))

    def polyline(self, pts, color, width=2, dash=None):
        d = ' stroke-dasharray="%s"' % dash if dash else ""
        self.add('<polyline points="%s" fill="none" stroke="%s" stroke-width="%s"%s/>'
                 % (" ".join("%.1f,%.1f" % p for p in pts), color, width, d))

    def render(self):
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
                'viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">\n'
                '<rect width="100%%" height="100%%" fill="white"/>\n%s\n</svg>\n'
                % (self.w, self.h, self.w, self.h, "\n".join(self.parts)))


def log_ticks(lo, hi):
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        ticks.append(10 ** e)
        e += 1
    return ticks


def tick_label(v):
    if v == 0:
        return "0"
    if v >= 1:
        return "{:,.0f}".format(v)
    return ("%f" % v).rstrip("0")


def latency_svg(lat):
    """Horizontal bars: p50 of SELECT 1 with 1 client, p95 and p99 as marks, log scale."""
    rows = [(m, lat[m]) for m in METHODS]
    rows = [(m, r) for m, r in rows if val(r, "p50_ms")]
    svg = Svg(800, 90 + 46 * len(rows))
    left, right, top = 170, 680, 50  # room on the right for the labels
    vals = [val(r, k) for _, r in rows for k in ("min_ms", "p99_ms") if val(r, k)]
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals)))

    def x(v):
        return left + (right - left) * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    svg.text(svg.w / 2, 22, "One-node SELECT 1, 1 client: latency (ms, log scale)", 15, "middle", "bold")
    svg.text(svg.w / 2, 40, "bar = p50, ◆ = p95, ● = p99", 11, "middle", color="#555")
    bottom = top + 46 * len(rows)
    for t in log_ticks(lo, hi):
        svg.line(x(t), top - 4, x(t), bottom, "#ddd")
        svg.text(x(t), bottom + 16, tick_label(t), 11, "middle", color="#555")
    for i, (m, r) in enumerate(rows):
        y = top + 46 * i + 8
        svg.text(left - 8, y + 18, METHOD_SHORT[m], 12, "end")
        svg.rect(left, y + 4, x(val(r, "p50_ms")) - left, 22, COLORS[m], 0.85)
        p95, p99 = val(r, "p95_ms"), val(r, "p99_ms")
        svg.add('<path d="M %.1f %.1f l 5 5 l -5 5 l -5 -5 z" fill="#222"/>' % (x(p95), y + 10))
        svg.circle(x(p99), y + 15, 4, "#222")
        svg.text(max(x(p99), x(p95), x(val(r, "p50_ms"))) + 10, y + 19,
                 "p50 %s ms" % fmt_ms(val(r, "p50_ms")), 11, color="#222")
    svg.text((left + right) / 2, bottom + 34, "milliseconds per call, measured by the client", 11, "middle", color="#555")
    return svg.render()


def throughput_svg(runs, lat):
    """Grouped bars: qps per method for 1, 8 and 32 clients, log scale."""
    clients = ["1", "8", "32"]
    data = {}
    for m in METHODS:
        for c in clients:
            r = lat[m] if c == "1" else find(runs, phase="throughput", method=m, clients=c)
            data[(m, c)] = val(r, "qps")
    present = [v for v in data.values() if v]
    svg = Svg(760, 400)
    left, right, top, bottom = 70, 740, 55, 330
    if not present:
        return svg.render()
    lo = 10 ** math.floor(math.log10(min(present)))
    hi = 10 ** math.ceil(math.log10(max(present)))

    def y(v):
        return bottom - (bottom - top) * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    svg.text(svg.w / 2, 22, "Throughput of SELECT 1 on one peer (queries/s, log scale)", 15, "middle", "bold")
    svg.text(svg.w / 2, 40, "pool_query: 1, 8, 32 client sessions sharing a pool of 4 connections to the peer", 11, "middle", color="#555")
    for t in log_ticks(lo, hi):
        svg.line(left, y(t), right, y(t), "#ddd")
        svg.text(left - 6, y(t) + 4, tick_label(t), 11, "end", color="#555")
    group_w = (right - left) / len(clients)
    bar_w = group_w * 0.8 / len(METHODS)
    for gi, c in enumerate(clients):
        gx = left + gi * group_w + group_w * 0.1
        for mi, m in enumerate(METHODS):
            v = data[(m, c)]
            if not v:
                continue
            bx = gx + mi * bar_w
            svg.rect(bx + 1, y(v), bar_w - 2, bottom - y(v), COLORS[m], 0.85)
            svg.text(bx + bar_w / 2, y(v) - 4, "{:,.0f}".format(v), 9, "middle", color="#333")
        svg.text(left + gi * group_w + group_w / 2, bottom + 18, "%s client%s" % (c, "" if c == "1" else "s"), 12, "middle")
    lx = left
    for m in METHODS:
        svg.rect(lx, 360, 12, 12, COLORS[m], 0.85)
        svg.text(lx + 16, 370, METHOD_SHORT[m], 11)
        lx += 16 + 7.2 * len(METHOD_SHORT[m]) + 20
    return svg.render()


def fanout_svg(runs, node_counts):
    """Two panels: median time of one call vs number of nodes, parallel and sequential."""
    svg = Svg(820, 380)
    svg.text(svg.w / 2, 22, "parallel_query fan-out vs pool_query to each node in turn (median of the calls)", 15, "middle", "bold")
    panels = [("sleep", "workload SELECT pg_sleep(0.05)", 60), ("select1", "workload SELECT 1", 450)]
    for workload, title, px in panels:
        left, right, top, bottom = px + 55, px + 360, 60, 300
        series = {}
        for mode in ("parallel", "sequential"):
            pts = []
            for n in node_counts:
                v = val(find(runs, phase="fanout", mode=mode, workload=workload, nodes=n), "p50_ms")
                if v is not None:
                    pts.append((n, v))
            series[mode] = pts
        allv = [v for pts in series.values() for _, v in pts]
        if not allv:
            continue
        ymax = max(allv) * 1.1
        step = nice_step(ymax / 5)
        ymax = math.ceil(ymax / step) * step
        xmax = max(node_counts)

        def X(n):
            return left + (right - left) * n / xmax

        def Y(v):
            return bottom - (bottom - top) * v / ymax

        svg.text((left + right) / 2, top - 12, title, 12, "middle", "bold")
        t = 0.0
        while t <= ymax + 1e-9:
            svg.line(left, Y(t), right, Y(t), "#ddd")
            svg.text(left - 6, Y(t) + 4, tick_label(round(t, 6)), 10, "end", color="#555")
            t += step
        for n in node_counts:
            svg.line(X(n), bottom, X(n), bottom + 4, "#555")
            if n != 1 or 2 not in node_counts:  # 1 and 2 would overlap
                svg.text(X(n), bottom + 17, str(n), 10, "middle", color="#555")
        svg.line(left, bottom, right, bottom, "#555")
        svg.text((left + right) / 2, bottom + 34, "nodes", 11, "middle", color="#555")
        svg.text(left - 42, (top + bottom) / 2, "ms per call", 11, "middle", color="#555", rotate=-90)
        for mode, color, dash in (("parallel", "#d62728", None), ("sequential", "#1f77b4", "6,4")):
            pts = [(X(n), Y(v)) for n, v in series[mode]]
            if pts:
                svg.polyline(pts, color, 2, dash)
                for p in pts:
                    svg.circle(p[0], p[1], 3, color)
    svg.line(300, 352, 330, 352, "#d62728", 2)
    svg.text(336, 356, "parallel_query", 11)
    svg.line(450, 352, 480, 352, "#1f77b4", 2, "6,4")
    svg.text(486, 356, "pool_query to each node in turn", 11)
    return svg.render()


def nice_step(raw):
    if raw <= 0:
        return 1
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


# ---- the report --------------------------------------------------------------------------------

def main():
    results, docs = sys.argv[1], sys.argv[2]
    runs = read_runs(os.path.join(results, "runs.jsonl"))
    env = read_kv(os.path.join(results, "env.txt"))
    reg = read_kv(os.path.join(results, "registry100.txt"))
    stats = {}
    sp = os.path.join(results, "pool_stats_peer1.json")
    if os.path.exists(sp) and os.path.getsize(sp) > 0:
        stats = json.load(open(sp))

    # summary.csv: every run, flat.
    with open(os.path.join(results, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "phase", "method", "mode", "workload", "nodes", "view", "clients",
                    "calls", "errors", "warmup_errors", "wall_s", "qps", "p50_ms", "p95_ms",
                    "p99_ms", "mean_ms", "max_ms", "peer1_pooled_sessions_max",
                    "peer1_other_sessions_max", "driver_failed"])
        for r in runs:
            t = r.get("tags", {})
            sm = r.get("sample_max") or []
            w.writerow([r.get("label"), t.get("phase"), t.get("method"), t.get("mode"),
                        t.get("workload"), t.get("nodes"), t.get("view"), r.get("clients"),
                        r.get("calls"), r.get("errors"), r.get("warmup_errors"), r.get("wall_s"),
                        r.get("qps"), r.get("p50_ms"), r.get("p95_ms"), r.get("p99_ms"),
                        r.get("mean_ms"), r.get("max_ms"), sm[0] if len(sm) > 0 else "",
                        sm[1] if len(sm) > 1 else "", r.get("driver_failed", "")])

    node_counts = [n for n in (1, 2, 5, 10, 20) if n <= int(env.get("peers", "20"))]
    lat = {m: merged_latency(runs, results, m) for m in METHODS}
    with open(os.path.join(docs, "benchmarks-latency.svg"), "w") as f:
        f.write(latency_svg(lat))
    with open(os.path.join(docs, "benchmarks-throughput.svg"), "w") as f:
        f.write(throughput_svg(runs, lat))
    with open(os.path.join(docs, "benchmarks-fanout.svg"), "w") as f:
        f.write(fanout_svg(runs, node_counts))

    pq, dp, dc = lat["pool_query"], lat["dblink_persistent"], lat["dblink_per_call"]
    r_persist = ratio(val(pq, "p50_ms"), val(dp, "p50_ms"))
    r_percall = ratio(val(pq, "p50_ms"), val(dc, "p50_ms"))
    fan = lambda mode, w, n: find(runs, phase="fanout", mode=mode, workload=w, nodes=n)
    p1, p10 = fan("parallel", "sleep", 1), fan("parallel", "sleep", 10)
    r_fan = ratio(val(p10, "p50_ms"), val(p1, "p50_ms"))
    pool_max = int(env.get("pool_max", "4"))
    tp_pq = [find(runs, phase="throughput", method="pool_query", clients=c) for c in ("8", "32")]
    peak_pooled = max([(r.get("sample_max") or [0])[0] for r in tp_pq if val(r, "calls") is not None] or [None],
                      key=lambda v: -1 if v is None else v)
    tp_errors = sum((r or {}).get("errors", 0) + (r or {}).get("warmup_errors", 0) for r in tp_pq)
    tp_ok = None
    if all(val(r, "calls") is not None for r in tp_pq) and peak_pooled is not None:
        tp_ok = tp_errors == 0 and peak_pooled <= pool_max + 1
    lat_ok = lambda r, limit: None if r is None else r <= limit

    L = []
    a = L.append
    a("# Benchmarks")
    a("")
    a("<!-- Generated by `make bench` (scripts/bench.sh, bench/report.py): edit those, not this file. -->")
    a("")
    a("The performance targets of the specification (SPEC §9), measured side by side in one run "
      "against the natural alternatives on the same machine. Regenerate with:")
    a("")
    a("```sh")
    a("make bench")
    a("```")
    a("")
    a("| | |")
    a("|---|---|")
    a("| date | %s |" % env.get("date", "?"))
    a("| machine | %s CPUs (`nproc`), %s MB memory, %s, %s |"
      % (env.get("nproc", "?"), env.get("memory_mb", "?"), env.get("cpu", "?"), env.get("kernel", "?")))
    a("| PostgreSQL | %s (coordinator and peers), pg_peerpool %s |"
      % (env.get("server_version", "?"), env.get("extension_version", "?")))
    a("| fleet | 1 coordinator + %s peers, all on 127.0.0.1 (TCP loopback), trust authentication |"
      % env.get("peers", "?"))
    a("| settings | peers: `shared_buffers = 16MB`, `max_connections = 50`; coordinator: "
      "`shared_preload_libraries = 'pg_peerpool'`, `peerpool.max_nodes = 128` (for section 4), "
      "defaults otherwise (so `peerpool.*` at their defaults: 5 s health checks, round-robin, "
      "30 s `acquire_timeout` and `query_timeout`); every node registered with "
      "`max_connections => %s` (and the default `min_connections => 1`) |" % pool_max)
    a("| runs | %s s measured per latency/throughput run (after a warm-up), %s calls per fan-out point |"
      % (env.get("seconds_per_run", "?"), env.get("fanout_calls", "?")))
    a("| runtime of `make bench` | %s s |" % env.get("runtime_s", "?"))
    a("| load average when it started | %s (1, 5, 15 min) |" % env.get("loadavg_before", "?"))
    a("| code | tree at commit `%s`, installed `pg_peerpool.so` md5 `%s…` |"
      % (env.get("tree_commit", "?"), env.get("installed_so_md5", "?")))
    a("| server crashes in the logs | %s |" % ("none" if env.get("crashes") == "0" else env.get("crashes", "?")))
    a("| pool manager restarts | %s |" % (
        "none (same process throughout)" if env.get("pool_manager_pid_start") and
        env.get("pool_manager_pid_start") == env.get("pool_manager_pid_end")
        else "**yes**: pid %s at the start, %s at the end" % (env.get("pool_manager_pid_start", "?"),
                                                          env.get("pool_manager_pid_end", "?"))))
    a("")
    a("Everything runs on the same %s CPUs: the load driver's client threads, the coordinator's "
      "backends, the pool manager and the peers compete for them. The numbers compare methods with "
      "each other on this machine; they are not capacity figures. Latencies are measured by the "
      "client (`bench/driver.cpp`, libpq, one connection per client thread), end to end."
      % env.get("nproc", "?"))
    a("")

    # Verdicts.
    a("## SPEC §9 targets")
    a("")
    a("| target | measured | verdict |")
    a("|---|---|---|")
    rounds = ""
    if val(pq, "rounds_p50") and val(dp, "rounds_p50"):
        rounds = " (per round: %s)" % ", ".join(
            fmt_ratio(ratio(a_, b_)) for a_, b_ in zip(pq["rounds_p50"], dp["rounds_p50"]))
    a("| one-node `SELECT 1` via `pool_query`: p50 ≤ 1.25 × dblink over a persistent connection "
      "| %s ms / %s ms = **%s**%s | %s |"
      % (fmt_ms(val(pq, "p50_ms")), fmt_ms(val(dp, "p50_ms")), fmt_ratio(r_persist), rounds,
         verdict(lat_ok(r_persist, 1.25))))
    a("| one-node `SELECT 1` via `pool_query`: p50 ≤ 0.2 × dblink connecting per call "
      "| %s ms / %s ms = **%s** | %s |"
      % (fmt_ms(val(pq, "p50_ms")), fmt_ms(val(dc, "p50_ms")), fmt_ratio(r_percall), verdict(lat_ok(r_percall, 0.2))))
    a("| `parallel_query` over 10 nodes ≤ 1.1 × the single-node time (`pg_sleep(0.05)`, p50) "
      "| %s ms / %s ms = **%s** | %s |"
      % (fmt_ms(val(p10, "p50_ms")), fmt_ms(val(p1, "p50_ms")), fmt_ratio(r_fan),
         verdict(None if r_fan is None or failed(p1) or failed(p10) else r_fan <= 1.1)))
    tp32 = tp_pq[1]
    lib32 = find(runs, phase="throughput", method="libpq_direct", clients="32")
    a("| 32 client sessions sharing pools of %d connections per node: no errors, no remote "
      "connection count above max, qps reported beside direct libpq "
      "| %s errors; at most %s `pg_peerpool` sessions seen on the peer (max %d); %s qps vs %s qps "
      "for direct libpq | %s |"
      % (pool_max, tp_errors, "n/a" if peak_pooled is None else peak_pooled, pool_max,
         fmt_qps(val(tp32, "qps")), fmt_qps(val(lib32, "qps")), verdict(tp_ok)))
    reset_lines, reset_sum = included_page(docs, "benchmarks-reset.md")
    if reset_lines is not None:
        parts, verdicts = [], []
        for pl in ("shared", "split"):
            r = reset_sum.get(pl)
            if not r:
                continue
            parts.append("%s: p50 %s ms with `DISCARD ALL` / %s ms without = **%s**; 8 clients: "
                         "%s vs %s qps, cost **%s**%s"
                         % (PLACEMENT_TEXT[pl], fmt_ms(r.get("p50_default")), fmt_ms(r.get("p50_none")),
                            fmt_ratio(r.get("p50_ratio")), fmt_qps(r.get("qps8_default")),
                            fmt_qps(r.get("qps8_none")),
                            "n/a" if r.get("cost8") is None else "%.1f %%" % r["cost8"],
                            "" if r.get("pgb_cost8") is None else
                            " (pgbouncer's same reset: p50 ×%s, cost %.1f %%)"
                            % (fmt_ratio(r.get("pgb_p50_ratio")), r["pgb_cost8"])))
            p50r = r.get("p50_ratio")
            verdicts.append("%s: %s" % (PLACEMENT_TEXT[pl], verdict(None if p50r is None else p50r <= 1.1)))
        a("| session hygiene costs nothing on the caller's path: one-client `SELECT 1` p50 unchanged by "
          "the default reset (counted as unchanged within 10 %%); the 8-client throughput cost reported "
          "beside `reset_query = ''` | %s ([2b](#2b-the-cost-of-session-hygiene-peerpoolreset_query)) | %s |"
          % ("; ".join(parts) or "n/a", "; ".join(verdicts) or "n/a"))
    a("| detection: a killed peer leaves `healthy` within 0.5 s; a frozen one becomes `unhealthy` "
      "within `interval × threshold + timeout` | measured by the TAP test `t/003_health.pl` "
      "(its `note` lines print the times) | not part of `make bench` |")
    large = lambda m: find(runs, phase="large", method=m)
    lg_pq, lg_rows, lg_json = large("pool_query_300k"), large("parallel_query_rows"), large("parallel_query")
    if lg_pq is not None:
        r_rows = ratio(val(lg_rows, "p50_ms"), val(lg_pq, "p50_ms"))
        r_json = ratio(val(lg_json, "p50_ms"), val(lg_pq, "p50_ms"))
        bad = any(r is None or failed(r) for r in (lg_pq, lg_rows, lg_json))
        a("| large results: `parallel_query_rows` over 3 nodes × 100k rows × 6 columns ≤ 1.2 × one "
          "`pool_query` returning the same 300k rows (p50) | %s ms / %s ms = **%s** | %s |"
          % (fmt_ms(val(lg_rows, "p50_ms")), fmt_ms(val(lg_pq, "p50_ms")), fmt_ratio(r_rows),
             verdict(None if bad or r_rows is None else r_rows <= 1.2)))
        a("| large results: `parallel_query` (jsonb) on the same work ≤ 2 × that (p50) "
          "| %s ms / %s ms = **%s** | %s |"
          % (fmt_ms(val(lg_json, "p50_ms")), fmt_ms(val(lg_pq, "p50_ms")), fmt_ratio(r_json),
             verdict(None if bad or r_json is None else r_json <= 2)))
    if reg:
        add_ms = float(reg["add_ms"]) if reg.get("add_ms") else None
        view_runs = [find(runs, phase="registry100", view=v) for v in ("nodes", "node_health", "pool_stats", "events")]
        worst = max([val(r, "p99_ms") for r in view_runs if val(r, "p99_ms") is not None] or [None],
                    key=lambda v: -1 if v is None else v)
        ok = None
        if add_ms is not None and worst is not None:
            ok = add_ms <= 100 and worst < 10 and not any(failed(r) for r in view_runs)
        a("| 100 registered nodes: adding one ≤ 100 ms; views return in < 10 ms "
          "| adding the 100th: %s ms (statement, including commit); slowest view p99: %s ms | %s |"
          % (fmt_ms(add_ms), fmt_ms(worst), verdict(ok)))
    scale_lines, sc = included_page(docs, "benchmarks-scale.md")
    if sc:
        n = sc.get("nodes")
        a("| %s nodes added in one statement over 10 peers: all `healthy` within 10 s; pool manager "
          "idle CPU ≤ 1 %% of a core with 5 s checks | %s of %s healthy after %.1f s, against %.1f s "
          "for plain libpq clients opening the same sessions (%s× that floor); %.2f %% of a core, "
          "against %s for a minimal epoll loop sending the same checks ([Scale](#scale-benchscalesh)) "
          "| %s (all healthy); %s (idle CPU) |"
          % ("{:,}".format(n), "{:,}".format(sc["healthy"]), "{:,}".format(n), sc["healthy_s"],
             sc["floor_s"], fmt_ratio(ratio(sc["healthy_s"], sc["floor_s"])), sc["cpu_pct"],
             "n/a" if sc.get("floor_cpu_pct") is None else "%.2f %%" % sc["floor_cpu_pct"],
             verdict(sc["healthy"] == n and sc["healthy_s"] <= 10), verdict(sc["cpu_pct"] <= 1)))
    a("")

    # 1. Latency.
    a("## 1. One-node `SELECT 1` latency, 1 client")
    a("")
    a("Each method runs `SELECT 1` on peer1 from one client session, as fast as it can, one call "
      "at a time, for %s rounds of %s s; the rounds are interleaved (every method once, then again) "
      "so that a disturbance of the machine hits them alike, and the percentiles are over all the "
      "calls of a method:" % (env.get("latency_rounds", "?"), env.get("seconds_per_run", "?")))
    a("")
    a("- `pool_query`: `SELECT * FROM peerpool.pool_query('SELECT 1', 'peer1') AS t(x int)` on the coordinator;")
    a("- dblink persistent: `SELECT dblink_connect('c', 'host=… port=… dbname=postgres')` once per "
      "client session, then `SELECT * FROM dblink('c', 'SELECT 1') AS t(x int)`;")
    a("- dblink per call: `SELECT * FROM dblink('host=… port=… dbname=postgres', 'SELECT 1') AS t(x int)`;")
    a("- postgres_fdw: `SELECT x FROM one_ft`, a foreign table over the view `one` "
      "(`SELECT 1 AS x`) on peer1;")
    a("- libpq direct: `SELECT 1` sent straight to peer1 (no coordinator: the floor).")
    a("")
    a("| method | calls | p50 ms | p95 ms | p99 ms | mean ms | p50 of each round, ms | errors | `pool_query` p50 ÷ this p50 | pool manager CPU | machine busy |")
    a("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in METHODS:
        r = lat[m]
        pct = lambda k: "n/a" if val(r, k) is None else "%.0f%%" % val(r, k)
        a("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"
          % (METHOD_TEXT[m], val(r, "calls") or "n/a", fmt_ms(val(r, "p50_ms")), fmt_ms(val(r, "p95_ms")),
             fmt_ms(val(r, "p99_ms")), fmt_ms(val(r, "mean_ms")),
             ", ".join(fmt_ms(v) for v in (val(r, "rounds_p50") or [])) or "n/a",
             "n/a" if r is None else r.get("errors", "n/a") if not r.get("driver_failed") else "hung/failed",
             fmt_ratio(ratio(val(pq, "p50_ms"), val(r, "p50_ms"))),
             pct("pool_manager_cpu_pct"), pct("machine_busy_pct")))
    a("")
    a("*Pool manager CPU*: the pool manager process's CPU time during the runs, in percent of one "
      "CPU; *machine busy*: the whole machine's, in percent of all its CPUs (mean of the rounds). "
      "With one client and nothing else running, one call at a time keeps the client, the "
      "coordinator's backend (and for `pool_query` the pool manager) and the peer's backend "
      "busy in turn, about one process at a time: roughly one CPU's worth (%s on this machine). "
      "Much more than that means other work was running on the machine during the benchmark."
      % ("%.0f%%" % (100.0 / int(env["nproc"])) if env.get("nproc", "").isdigit() else "?"))
    a("")
    a("![SELECT 1 latency by method](benchmarks-latency.svg)")
    a("")
    if val(dc, "p50_ms") is not None:
        a("dblink connecting per call is dominated by PostgreSQL's connection start-up: each call "
          "opens a connection, which starts a new backend process on the peer, and closes it "
          "(p50 %s ms per call on this virtual machine, where starting a backend is slow); every "
          "pooled or persistent method avoids that." % fmt_ms(val(dc, "p50_ms")))
        a("")

    # 2. Throughput.
    a("## 2. Throughput with 8 and 32 concurrent clients")
    a("")
    a("The same five statements, from 8 and then 32 client sessions at once, each for %s s. "
      "`pool_query` sessions share peer1's pool of at most %d connections; the other methods "
      "open one remote session per client (dblink per call: one per call). While each run "
      "lasts, a sampler polls peer1's `pg_stat_activity` every 50 ms: *pooled* counts the sessions "
      "with `application_name = 'pg_peerpool'` (the pool manager's), *other* the remaining client "
      "sessions (the sampler's own excluded). The pool keeps its connections after a run "
      "(until `peerpool.idle_timeout`), so *pooled* stays at the pool's size during the other "
      "methods' runs too. *Pool manager CPU* is the pool manager process's CPU time during the "
      "run, in percent of one CPU; *machine busy* is the whole machine's, in percent of all %s "
      "CPUs." % (env.get("seconds_per_run", "?"), pool_max, env.get("nproc", "?")))
    a("")
    a("| clients | method | qps | qps ÷ libpq direct | p50 ms | p95 ms | p99 ms | errors | peak sessions on peer1: pooled / other | pool manager CPU | machine busy |")
    a("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for c in ("8", "32"):
        lib = find(runs, phase="throughput", method="libpq_direct", clients=c)
        for m in METHODS:
            r = find(runs, phase="throughput", method=m, clients=c)
            sm = (r or {}).get("sample_max") or []
            errs = "n/a" if r is None else ("hung/failed" if r.get("driver_failed") else
                                            str(r.get("errors", 0) + r.get("warmup_errors", 0)))
            pct = lambda k: "n/a" if val(r, k) is None else "%.0f%%" % val(r, k)
            a("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"
              % (c, METHOD_SHORT[m], fmt_qps(val(r, "qps")), fmt_ratio(ratio(val(r, "qps"), val(lib, "qps"))),
                 fmt_ms(val(r, "p50_ms")), fmt_ms(val(r, "p95_ms")), fmt_ms(val(r, "p99_ms")), errs,
                 " / ".join(str(v) for v in sm) if sm else "n/a", pct("pool_manager_cpu_pct"),
                 pct("machine_busy_pct")))
    a("")
    if stats:
        a("`peerpool.pool_stats` for peer1 after the throughput runs (reset before them): "
          "%s acquires, %s acquire timeouts, %s queries, %s errors, %s connections created, "
          "average query time %s ms."
          % (stats.get("acquires"), stats.get("acquire_timeouts"), stats.get("queries"),
             stats.get("errors"), stats.get("created"),
             fmt_ms(stats.get("avg_query_ms")) if stats.get("avg_query_ms") is not None else "n/a"))
        a("")
    a("![Throughput by method and number of clients](benchmarks-throughput.svg)")
    a("")
    q8, q32 = val(tp_pq[0], "qps"), val(tp_pq[1], "qps")
    d8 = val(find(runs, phase="throughput", method="dblink_persistent", clients="8"), "qps")
    d32 = val(find(runs, phase="throughput", method="dblink_persistent", clients="32"), "qps")
    if q8 and q32 and d8 and d32:
        a("From 8 to 32 client sessions, `pool_query` goes from %s to %s qps (×%s) and dblink over "
          "persistent connections from %s to %s qps (×%s). At 32 sessions the pool manager process "
          "used %s of one CPU and the machine was %s busy. Every `pool_query` call passes through "
          "that one process, which has to be scheduled twice per call (request in, answer out) "
          "among all the runnable processes sharing the CPUs, and 32 sessions share 4 remote "
          "connections (the others wait in the node's FIFO queue); dblink and postgres_fdw do "
          "their remote work in each caller's own backend, with one remote session per caller."
          % (fmt_qps(q8), fmt_qps(q32), fmt_ratio(q32 / q8), fmt_qps(d8), fmt_qps(d32),
             fmt_ratio(d32 / d8),
             "n/a" if val(tp_pq[1], "pool_manager_cpu_pct") is None else "%.0f%%" % tp_pq[1]["pool_manager_cpu_pct"],
             "n/a" if val(tp_pq[1], "machine_busy_pct") is None else "%.0f%%" % tp_pq[1]["machine_busy_pct"]))
        a("")

    # 2b. The cost of the reset: bench/reset.sh writes its own page.
    if reset_lines is not None:
        a("## 2b. The cost of session hygiene (`peerpool.reset_query`)")
        a("")
        body = [line for line in reset_lines if not line.startswith("# Reset cost:")]
        while body and not body[0].strip():
            body.pop(0)
        while body and not body[-1].strip():
            body.pop()
        for line in body:
            a(line)
        a("")
        a(RESET_EXPLANATION)
        a("")

    # 3. Fan-out.
    a("## 3. `parallel_query` fan-out")
    a("")
    a("One client calls `SELECT count(*) FILTER (WHERE success) FROM peerpool.parallel_query(q, "
      "ARRAY['peer1', …, 'peerN'])` %s times per point (the result must be N, else the call counts "
      "as an error); the baseline is `pool_query` to each node in turn, in one statement: "
      "`SELECT count(*) FROM unnest(ARRAY[…]) AS n(node) CROSS JOIN LATERAL "
      "peerpool.pool_query(q, n.node) AS t(x text)`. Times are the median (p50) of the calls, in ms."
      % env.get("fanout_calls", "?"))
    a("")
    a("| nodes | parallel `pg_sleep(0.05)` | sequential `pg_sleep(0.05)` | sequential ÷ parallel | "
      "parallel ÷ 1-node parallel | parallel `SELECT 1` | sequential `SELECT 1` | sequential ÷ parallel | errors |")
    a("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in node_counts:
        ps, ss = fan("parallel", "sleep", n), fan("sequential", "sleep", n)
        p1s, s1 = fan("parallel", "select1", n), fan("sequential", "select1", n)
        errs = sum(0 if r is None else (r.get("errors", 0) + r.get("warmup_errors", 0) +
                                        (1 if r.get("driver_failed") else 0)) for r in (ps, ss, p1s, s1))
        a("| %d | %s | %s | %s | %s | %s | %s | %s | %d |"
          % (n, fmt_ms(val(ps, "p50_ms")), fmt_ms(val(ss, "p50_ms")),
             fmt_ratio(ratio(val(ss, "p50_ms"), val(ps, "p50_ms"))),
             fmt_ratio(ratio(val(ps, "p50_ms"), val(p1, "p50_ms"))),
             fmt_ms(val(p1s, "p50_ms")), fmt_ms(val(s1, "p50_ms")),
             fmt_ratio(ratio(val(s1, "p50_ms"), val(p1s, "p50_ms"))), errs))
    a("")
    a("![parallel_query fan-out](benchmarks-fanout.svg)")
    a("")
    a("With `pg_sleep(0.05)` the remote work dominates: the parallel call stays near one sleep "
      "whatever the node count, and the sequential loop grows by one sleep per node. With "
      "`SELECT 1` there is almost no remote work, so both grow with the node count; what remains "
      "is the cost per node (the pool manager sends each node's query and reads its answer, the "
      "calling backend turns each answer into jsonb), on CPUs shared with the peers. For one "
      "node, `parallel_query` costs a little more than `pool_query` because of that jsonb.")
    a("")

    if lg_pq is not None:
        a("## 3b. Large results")
        a("")
        a("Peers 1–3 each hold a table `big` of 100,000 rows × 6 columns (int, int, 32-character "
          "text, timestamptz, boolean, numeric) and peer1 a table `big3` with those rows three "
          "times. One client calls each statement %s times (after one warm-up call); times are "
          "the median (p50) and the slowest call, in ms. The baseline is one `pool_query` "
          "returning the same 300,000 rows from one node."
          % env.get("large_calls", "?"))
        a("")
        a("| call | p50 ms | max ms | ÷ `pool_query` 300k | errors |")
        a("|---|---:|---:|---:|---:|")
        for label, m in (("`pool_query('SELECT * FROM big3', 'peer1')`, 300k rows", "pool_query_300k"),
                         ("`parallel_query_rows('SELECT * FROM big')`, 3 × 100k rows", "parallel_query_rows"),
                         ("`parallel_query('SELECT * FROM big')`, 3 × 100k rows as jsonb", "parallel_query"),
                         ("`parallel_query('SELECT * FROM big')`, 1 × 100k rows as jsonb", "parallel_query_1")):
            r = large(m)
            a("| %s | %s | %s | %s | %s |"
              % (label, fmt_ms(val(r, "p50_ms")), fmt_ms(val(r, "max_ms")),
                 fmt_ratio(ratio(val(r, "p50_ms"), val(lg_pq, "p50_ms"))),
                 "n/a" if r is None else r.get("errors", 0) + (1 if r.get("driver_failed") else 0)))
        a("")
        a("The calling backend converts each node's rows as they arrive, while the other nodes "
          "are still sending: `parallel_query_rows` through the input functions of the column "
          "definition list into a tuplestore, as `pool_query` does; `parallel_query` into one "
          "binary `jsonb` object per row, assembled into each node's array at the end. What "
          "`parallel_query` costs beyond that is memory traffic: the rows' binary form, the "
          "array, and the tuplestore's copy of it, each touched once.")
        a("")

    if reg:
        a("## 4. A registry of 100 nodes")
        a("")
        peers = int(env.get("peers", "20"))
        a("After the measurements above, %d more nodes are registered (`node%d` … `node100`, each "
          "pointing at one of the %d peers, `peerpool.max_nodes = 128` on the coordinator). The "
          "100th `pool_add_node` is timed by the client (the statement, including its commit, "
          "which wakes the pool manager), then the time until the pool manager shows that node "
          "`healthy` in `peerpool.node_health`. Each view is then read with `SELECT *` %s times."
          % (100 - peers, peers + 1, peers, reg.get("view_calls", "?")))
        a("")
        a("| measurement | value |")
        a("|---|---:|")
        a("| `pool_add_node` of the 100th node (statement incl. commit) | %s ms |" % fmt_ms(float(reg["add_ms"])) if reg.get("add_ms") else "| `pool_add_node` of the 100th node | n/a |")
        if reg.get("add_median_ms"):
            a("| median `pool_add_node` time over the %d added nodes | %s ms |"
              % (100 - peers, fmt_ms(float(reg["add_median_ms"]))))
        if reg.get("healthy_after_ms"):
            a("| from that commit until the node is `healthy` | %s ms |" % fmt_ms(float(reg["healthy_after_ms"])))
        a("| nodes registered | %s |" % reg.get("nodes", "?"))
        a("")
        a("| view (`SELECT *`, 100 nodes) | rows | p50 ms | p99 ms | max ms | errors |")
        a("|---|---:|---:|---:|---:|---:|")
        for v in ("nodes", "node_health", "pool_stats", "events"):
            r = find(runs, phase="registry100", view=v)
            a("| `peerpool.%s` | %s | %s | %s | %s | %s |"
              % (v, reg.get("rows_" + v, "?"), fmt_ms(val(r, "p50_ms")), fmt_ms(val(r, "p99_ms")),
                 fmt_ms(val(r, "max_ms")), "n/a" if r is None else r.get("errors", "n/a")))
        a("")

    # Where the overhead comes from.
    a("## Where `pool_query`'s overhead comes from")
    a("")
    a("dblink over a persistent connection is the closest alternative: the caller's backend "
      "itself holds a libpq connection and does one network round trip to the peer. A "
      "`pool_query` call takes a longer path, all on the same machine:")
    a("")
    a("1. **backend → shared memory.** The calling backend encodes the request, creates the two "
      "`shm_mq` queues of its request slot (one per backend, in the extension's shared memory), "
      "marks the slot submitted and sets the pool manager's latch.")
    a("2. **pool manager wakes.** The pool manager's `WaitEventSetWait` returns; it scans the "
      "request slots, attaches to the queues, reads the request, routes it (here: the node by "
      "name) and leases an idle pooled connection, or queues the caller FIFO when all "
      "`max_connections` of the node are busy.")
    a("3. **libpq → peer → back.** It sends the SQL non-blocking over that connection and goes "
      "back to its event loop; when the socket is readable it reads the rows (single-row mode).")
    a("4. **shared memory → backend.** It writes the rows, then the end, to the response queue, "
      "which sets the caller's latch; the connection goes back to the pool. The backend wakes, "
      "reads the queue and builds its result set (a tuplestore, with the column definition list "
      "applied through the types' input functions).")
    a("")
    a("Compared with dblink, that is one more process on the path and at least two extra wake-ups "
      "per call (backend → pool manager, pool manager → backend), each a latch set (a `kill()` "
      "when the other side sleeps) and a context switch, plus the encoding and the copies through "
      "the queues. In this version the two queues are created for each call and detached at its "
      "end, and PostgreSQL's `shm_mq_detach` sets the other side's latch, so the detaches can wake "
      "the other process once more. dblink's backend, by contrast, waits on the peer's socket "
      "itself: no other process is involved.")
    a("")
    sc_calls = int(read_kv(os.path.join(results, "strace_calls.txt")).get("calls", "0") or 0)
    sb = read_strace(os.path.join(results, "strace_backend.txt"))
    sm_ = read_strace(os.path.join(results, "strace_pool_manager.txt"))
    # Each process sends exactly one message per call: the backend its reply to the client, the
    # pool manager the query to the peer. Their own sendto counts are the exact divisors (the
    # pool_stats count spans a slightly longer window than the traces).
    nb, nm = sb.get("sendto", sc_calls), sm_.get("sendto", sc_calls)
    if nb > 0 and nm > 0 and (sb or sm_):
        names = sorted(set(sb) | set(sm_), key=lambda n: -(sb.get(n, 0) / nb + sm_.get(n, 0) / nm))
        names = [n for n in names if sb.get(n, 0) / nb + sm_.get(n, 0) / nm >= 0.05]
        a("System calls per `pool_query('SELECT 1')` call, counted by `make bench` with `strace -c` "
          "on the calling backend and on the pool manager for 3 s of a one-client loop (about %d "
          "calls; each process's counts are divided by its own `sendto` count, since each sends "
          "exactly one message per call: the backend its reply to the client, the pool manager "
          "the query to the peer; strace slows both processes, the ratios are what matters):"
          % max(nb, nm))
        a("")
        a("| system call | calling backend, per call | pool manager, per call | what it is |")
        a("|---|---:|---:|---|")
        what = {
            "kill": "setting a sleeping process's latch (SIGURG)",
            "epoll_wait": "waiting for a latch or a socket",
            "read": "draining the latch's signal file descriptor",
            "sendto": "sending to a socket (client, or peer)",
            "recvfrom": "reading a socket",
            "epoll_ctl": "changing a wait set",
            "epoll_create1": "creating a wait set",
            "close": "closing a file descriptor",
        }
        for n in names:
            a("| `%s` | %.2f | %.2f | %s |" % (n, sb.get(n, 0) / nb, sm_.get(n, 0) / nm,
                                              what.get(n, "")))
        a("")
    a("On an idle machine these steps cost tens of microseconds: small next to a network round "
      "trip between machines, but visible next to a loopback `SELECT 1` that costs only ~%s ms "
      "from libpq, and on 2 CPUs the extra process competes with the client, the caller's "
      "backend and the peer for the same cores. What `pool_query` buys for it is connection "
      "reuse across sessions (no connection start-up, unlike dblink per call), a hard cap on "
      "remote sessions however many callers there are, health-aware routing, and "
      "`parallel_query`'s fan-out. Fewer wake-ups per call (for example, queues that stay "
      "attached for the session instead of being created and detached per call) would narrow the "
      "gap to dblink."
      % fmt_ms(val(lat["libpq_direct"], "p50_ms")))
    a("")
    a("## Raw results")
    a("")
    a("`make bench` leaves them in `bench/results/` (not committed): `runs.jsonl` (one JSON object "
      "per driver run, as printed by `bench/driver`), `summary.csv` (the same, flat), `env.txt`, "
      "`pool_stats_peer1.json`, `registry100.txt`, the per-call latencies of phase 1 "
      "(`latencies_*.txt`), the `strace -c` summaries (`strace_*.txt`) and the server logs in "
      "`logs/`. The knobs "
      "`BENCH_SECONDS`, `BENCH_FANOUT_CALLS` and `BENCH_PEERS` (environment) shorten or lengthen a "
      "run; the numbers above come from the defaults.")
    a("")
    # The scale phase (bench/scale.sh) writes its own page; keep it in this report.
    if scale_lines is not None:
        a("## Scale (bench/scale.sh)")
        a("")
        for line in scale_lines:
            a(line.replace("# Scale:", "### Scale:", 1) if line.startswith("# Scale:") else line)
        a("")
        # Notes written by hand about earlier runs (docs/benchmarks-scale-notes.md), one
        # heading level down.
        notes = os.path.join(docs, "benchmarks-scale-notes.md")
        if os.path.exists(notes):
            with open(notes) as f:
                for line in f.read().splitlines():
                    a("##" + line if line.startswith("#") else line)
            a("")
    with open(os.path.join(docs, "benchmarks.md"), "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    main()
