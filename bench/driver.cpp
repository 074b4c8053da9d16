// The load driver of `make bench` (bench/README.md, docs/benchmarks.md).
//
// Runs one SQL statement repeatedly from N client threads, each with its own libpq connection,
// and prints one JSON object: calls, errors, qps and latency percentiles of the successful calls.
// Optionally a sampler thread polls another server (a peer) every few milliseconds with a query
// returning integers and reports the maximum of each column over the measured window: this is
// how the benchmark watches the number of pooled sessions a peer sees.
//
// This is a client program: threads are fine here (each thread owns its PGconn; libpq is
// thread-safe per connection). It never runs inside PostgreSQL.
//
// Usage: driver --conninfo STR --sql STR [options]    (driver --help lists them)
#include <libpq-fe.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace
{

using Clock = std::chrono::steady_clock;

struct Options {
    std::string conninfo;
    std::string sql;
    std::vector<std::string> setup; // run once per connection, before the warm-up
    int clients = 1;
    long iterations = 0;   // per client; 0 = use duration
    double duration_s = 0; // measured window when iterations == 0
    long warmup = 0;       // unmeasured calls per client before the window opens
    bool has_expect = false;
    std::string expect; // first column of the first row must equal this, else an error
    std::string label;
    std::vector<std::pair<std::string, std::string>> tags;
    std::string sample_conninfo;
    std::string sample_sql;
    int sample_ms = 50;
    std::string latencies_file; // optional: every measured latency (ms), one per line
};

struct PgConnDeleter {
    void operator()(PGconn *c) const { PQfinish(c); }
};
using ConnPtr = std::unique_ptr<PGconn, PgConnDeleter>;

struct PgResultDeleter {
    void operator()(PGresult *r) const { PQclear(r); }
};
using ResultPtr = std::unique_ptr<PGresult, PgResultDeleter>;

// What one client thread measured.
struct ClientResult {
    std::vector<double> latencies_ms;
    long errors = 0;
    long warmup_errors = 0;            // errors while connecting and warming up
    std::vector<std::string> messages; // the first few distinct error messages
};

void Usage()
{
    std::fputs(
        "usage: driver --conninfo STR --sql STR [options]\n"
        "  --clients N           client threads, one connection each (default 1)\n"
        "  --iterations N        measured calls per client\n"
        "  --duration SEC        measured window (when --iterations is not given)\n"
        "  --warmup N            unmeasured calls per client first (default 0)\n"
        "  --setup SQL           run once per connection before the warm-up (repeatable)\n"
        "  --expect STR          the first value returned must equal STR, else it is an error\n"
        "  --label STR           name of this run in the output\n"
        "  --tag KEY=VALUE       extra string field in the output's \"tags\" (repeatable)\n"
        "  --sample-conninfo STR server to poll during the window\n"
        "  --sample-sql SQL      query returning one row of integers; the max of each is kept\n"
        "  --sample-ms N         polling period (default 50)\n"
        "  --latencies FILE      write every measured latency (ms), one per line\n",
        stderr);
}

bool ParseArgs(int argc, char **argv, Options &o)
{
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--help" || a == "-h")
            return false;
        if (i + 1 >= argc) {
            std::fprintf(stderr, "driver: %s needs a value\n", a.c_str());
            return false;
        }
        std::string v = argv[++i];
        if (a == "--conninfo")
            o.conninfo = v;
        else if (a == "--sql")
            o.sql = v;
        else if (a == "--setup")
            o.setup.push_back(v);
        else if (a == "--clients")
            o.clients = std::atoi(v.c_str());
        else if (a == "--iterations")
            o.iterations = std::atol(v.c_str());
        else if (a == "--duration")
            o.duration_s = std::atof(v.c_str());
        else if (a == "--warmup")
            o.warmup = std::atol(v.c_str());
        else if (a == "--expect") {
            o.has_expect = true;
            o.expect = v;
        } else if (a == "--label")
            o.label = v;
        else if (a == "--tag") {
            auto eq = v.find('=');
            if (eq == std::string::npos) {
                std::fprintf(stderr, "driver: --tag wants KEY=VALUE\n");
                return false;
            }
            o.tags.emplace_back(v.substr(0, eq), v.substr(eq + 1));
        } else if (a == "--sample-conninfo")
            o.sample_conninfo = v;
        else if (a == "--sample-sql")
            o.sample_sql = v;
        else if (a == "--sample-ms")
            o.sample_ms = std::max(1, std::atoi(v.c_str()));
        else if (a == "--latencies")
            o.latencies_file = v;
        else {
            std::fprintf(stderr, "driver: unknown option %s\n", a.c_str());
            return false;
        }
    }
    if (o.conninfo.empty() || o.sql.empty() || o.clients < 1 ||
        (o.iterations <= 0 && o.duration_s <= 0)) {
        std::fprintf(stderr, "driver: --conninfo, --sql and --iterations or --duration are "
                             "required\n");
        return false;
    }
    if (o.sample_conninfo.empty() != o.sample_sql.empty()) {
        std::fprintf(stderr, "driver: --sample-conninfo and --sample-sql go together\n");
        return false;
    }
    return true;
}

std::string Trim(std::string s)
{
    while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
        s.pop_back();
    return s;
}

void NoteError(ClientResult &r, const std::string &message)
{
    r.errors++;
    std::string m = Trim(message);
    if (r.messages.size() < 3 &&
        std::find(r.messages.begin(), r.messages.end(), m) == r.messages.end())
        r.messages.push_back(m);
}

// Connects and runs the setup statements; on failure notes the error and returns null.
ConnPtr Connect(const Options &o, ClientResult &r)
{
    ConnPtr conn(PQconnectdb(o.conninfo.c_str()));
    if (PQstatus(conn.get()) != CONNECTION_OK) {
        NoteError(r, std::string("connect: ") + PQerrorMessage(conn.get()));
        return nullptr;
    }
    for (const auto &s : o.setup) {
        ResultPtr res(PQexec(conn.get(), s.c_str()));
        ExecStatusType st = PQresultStatus(res.get());
        if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
            NoteError(r, std::string("setup: ") + PQerrorMessage(conn.get()));
            return nullptr;
        }
    }
    return conn;
}

// One call of the statement. Returns true on success (and the expected value, if any).
bool RunOnce(const Options &o, PGconn *conn, ClientResult &r)
{
    ResultPtr res(PQexec(conn, o.sql.c_str()));
    ExecStatusType st = PQresultStatus(res.get());
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        NoteError(r, PQerrorMessage(conn));
        return false;
    }
    if (o.has_expect) {
        std::string got =
            (st == PGRES_TUPLES_OK && PQntuples(res.get()) > 0 && PQnfields(res.get()) > 0)
                ? PQgetvalue(res.get(), 0, 0)
                : std::string("<no rows>");
        if (got != o.expect) {
            NoteError(r, "unexpected result: got " + got + ", expected " + o.expect);
            return false;
        }
    }
    return true;
}

// Start line: every client connects and warms up, then all start measuring together.
class StartGate
{
public:
    explicit StartGate(int parties) : waiting_(parties) {}
    void ArriveAndWait()
    {
        std::unique_lock<std::mutex> lock(mutex_);
        if (--waiting_ == 0)
            all_ready_.notify_all();
        open_cv_.wait(lock, [this] { return open_; });
    }
    void WaitAllReady()
    {
        std::unique_lock<std::mutex> lock(mutex_);
        all_ready_.wait(lock, [this] { return waiting_ == 0; });
    }
    void Open()
    {
        std::lock_guard<std::mutex> lock(mutex_);
        open_ = true;
        open_cv_.notify_all();
    }

private:
    std::mutex mutex_;
    std::condition_variable all_ready_, open_cv_;
    int waiting_;
    bool open_ = false;
};

void ClientThread(const Options &o, StartGate &gate, const Clock::time_point *deadline,
                  ClientResult &r)
{
    ConnPtr conn = Connect(o, r);
    for (long i = 0; conn && i < o.warmup; i++)
        RunOnce(o, conn.get(), r);
    r.warmup_errors = r.errors; // reported apart; their messages are kept
    r.errors = 0;
    gate.ArriveAndWait();
    if (!conn) {
        r.errors = 1; // a client that could not connect or set up is one measured error
        return;
    }
    if (o.iterations > 0)
        r.latencies_ms.reserve(static_cast<size_t>(o.iterations));
    for (long i = 0;; i++) {
        if (o.iterations > 0 ? i >= o.iterations : Clock::now() >= *deadline)
            break;
        auto t0 = Clock::now();
        bool ok = RunOnce(o, conn.get(), r);
        auto t1 = Clock::now();
        if (ok)
            r.latencies_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        else if (PQstatus(conn.get()) != CONNECTION_OK) {
            conn = Connect(o, r); // a broken connection is replaced; the failure was counted
            if (!conn)
                return;
        }
    }
}

// Polls the sample query until told to stop; keeps the max of each integer column.
struct Sampler {
    std::vector<long> max;
    long samples = 0;
    long errors = 0;
    std::string first_error;
};

void SamplerThread(const Options &o, const std::atomic<bool> &stop, Sampler &s)
{
    ConnPtr conn(PQconnectdb(o.sample_conninfo.c_str()));
    if (PQstatus(conn.get()) != CONNECTION_OK) {
        s.errors++;
        s.first_error = Trim(PQerrorMessage(conn.get()));
        return;
    }
    while (!stop.load()) {
        auto next = Clock::now() + std::chrono::milliseconds(o.sample_ms);
        ResultPtr res(PQexec(conn.get(), o.sample_sql.c_str()));
        if (PQresultStatus(res.get()) == PGRES_TUPLES_OK && PQntuples(res.get()) > 0) {
            int n = PQnfields(res.get());
            if (s.max.size() < static_cast<size_t>(n))
                s.max.resize(static_cast<size_t>(n), 0);
            for (int i = 0; i < n; i++)
                s.max[static_cast<size_t>(i)] =
                    std::max(s.max[static_cast<size_t>(i)], std::atol(PQgetvalue(res.get(), 0, i)));
            s.samples++;
        } else {
            if (s.errors++ == 0)
                s.first_error = Trim(PQerrorMessage(conn.get()));
        }
        std::this_thread::sleep_until(next);
    }
}

std::string JsonString(const std::string &s)
{
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
        case '"':
            out += "\\\"";
            break;
        case '\\':
            out += "\\\\";
            break;
        case '\n':
            out += "\\n";
            break;
        case '\t':
            out += "\\t";
            break;
        case '\r':
            out += "\\r";
            break;
        default:
            if (c < 0x20) {
                char buf[8];
                std::snprintf(buf, sizeof(buf), "\\u%04x", c);
                out += buf;
            } else
                out += static_cast<char>(c);
        }
    }
    return out + "\"";
}

std::string JsonNumber(double v)
{
    if (!std::isfinite(v))
        return "null";
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.4f", v);
    return buf;
}

// Nearest-rank percentile of a sorted vector.
double Percentile(const std::vector<double> &sorted, double p)
{
    if (sorted.empty())
        return NAN;
    size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
    return sorted[std::min(sorted.size(), std::max<size_t>(rank, 1)) - 1];
}

} // namespace

int main(int argc, char **argv)
{
    Options o;
    if (!ParseArgs(argc, argv, o)) {
        Usage();
        return 2;
    }

    std::vector<ClientResult> results(static_cast<size_t>(o.clients));
    std::vector<std::thread> threads;
    StartGate gate(o.clients);
    Clock::time_point deadline;
    for (int i = 0; i < o.clients; i++)
        threads.emplace_back(ClientThread, std::cref(o), std::ref(gate), &deadline,
                             std::ref(results[static_cast<size_t>(i)]));

    gate.WaitAllReady();
    std::atomic<bool> stop_sampler{false};
    Sampler sampler;
    std::thread sampler_thread;
    if (!o.sample_conninfo.empty())
        sampler_thread =
            std::thread(SamplerThread, std::cref(o), std::cref(stop_sampler), std::ref(sampler));
    auto start = Clock::now();
    deadline = start + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(o.duration_s));
    gate.Open(); // the deadline is written before the gate opens (the mutex orders it)
    for (auto &t : threads)
        t.join();
    auto end = Clock::now();
    stop_sampler = true;
    if (sampler_thread.joinable())
        sampler_thread.join();

    std::vector<double> all;
    long errors = 0, warmup_errors = 0;
    std::vector<std::string> messages;
    for (const auto &r : results) {
        all.insert(all.end(), r.latencies_ms.begin(), r.latencies_ms.end());
        errors += r.errors;
        warmup_errors += r.warmup_errors;
        for (const auto &m : r.messages)
            if (messages.size() < 5 &&
                std::find(messages.begin(), messages.end(), m) == messages.end())
                messages.push_back(m);
    }
    std::sort(all.begin(), all.end());
    double wall_s = std::chrono::duration<double>(end - start).count();
    double sum = 0;
    for (double v : all)
        sum += v;

    if (!o.latencies_file.empty()) {
        std::ofstream f(o.latencies_file);
        for (double v : all)
            f << v << '\n';
    }

    std::string out = "{\"label\": " + JsonString(o.label) + ", \"tags\": {";
    for (size_t i = 0; i < o.tags.size(); i++)
        out += (i ? ", " : "") + JsonString(o.tags[i].first) + ": " + JsonString(o.tags[i].second);
    out += "}, \"sql\": " + JsonString(o.sql);
    out += ", \"clients\": " + std::to_string(o.clients);
    out += ", \"calls\": " + std::to_string(all.size());
    out += ", \"errors\": " + std::to_string(errors);
    out += ", \"warmup_errors\": " + std::to_string(warmup_errors);
    out += ", \"wall_s\": " + JsonNumber(wall_s);
    out += ", \"qps\": " + JsonNumber(wall_s > 0 ? static_cast<double>(all.size()) / wall_s : 0);
    out +=
        ", \"mean_ms\": " + JsonNumber(all.empty() ? NAN : sum / static_cast<double>(all.size()));
    out += ", \"min_ms\": " + JsonNumber(all.empty() ? NAN : all.front());
    out += ", \"p50_ms\": " + JsonNumber(Percentile(all, 50));
    out += ", \"p95_ms\": " + JsonNumber(Percentile(all, 95));
    out += ", \"p99_ms\": " + JsonNumber(Percentile(all, 99));
    out += ", \"max_ms\": " + JsonNumber(all.empty() ? NAN : all.back());
    out += ", \"sample_max\": [";
    for (size_t i = 0; i < sampler.max.size(); i++)
        out += (i ? ", " : "") + std::to_string(sampler.max[i]);
    out += "], \"samples\": " + std::to_string(sampler.samples);
    out += ", \"sample_errors\": " + std::to_string(sampler.errors);
    out += ", \"error_messages\": [";
    if (!sampler.first_error.empty())
        messages.push_back("sampler: " + sampler.first_error);
    for (size_t i = 0; i < messages.size(); i++)
        out += (i ? ", " : "") + JsonString(messages[i]);
    out += "]}";
    std::puts(out.c_str());
    // A one-line human summary on stderr, for the console of `make bench`.
    std::fprintf(stderr,
                 "  %-34s clients=%-3d calls=%-7zu errors=%-3ld qps=%-9.1f p50=%.3f p95=%.3f "
                 "p99=%.3f ms\n",
                 o.label.c_str(), o.clients, all.size(), errors,
                 wall_s > 0 ? static_cast<double>(all.size()) / wall_s : 0.0, Percentile(all, 50),
                 Percentile(all, 95), Percentile(all, 99));
    for (const auto &m : messages)
        std::fprintf(stderr, "    error: %s\n", m.c_str());
    return 0;
}
