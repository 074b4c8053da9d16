// The idle-CPU floor of bench/scale.sh: the least any pooler must spend to health-check N
// nodes every interval, measured on the same machine in the same run as pg_peerpool's pool
// manager. One process, one epoll loop, one non-blocking libpq connection per node. Each
// node's check -- the same query string pg_peerpool sends (--sql) -- goes out at its own point
// of the interval, spread evenly (with --grid-ms rounded to a grid, so that the checks due
// together share a wake-up, as in pg_peerpool), and its answer is read. Nothing else: no state
// machine, no shared memory, no pools, no arrival stamps.
//
// Usage: checkloop --conninfo STR [--conninfo STR ...] --nodes N --interval-ms MS --sql SQL
//                  --seconds S [--grid-ms G]
// Connects N sessions (round robin over the conninfos, 64 attempts at a time), runs the
// checks for one interval to settle, then S seconds measured, and prints one line:
//   checks=<n> failed=<n> cpu_user_pct=<x> cpu_sys_pct=<y>
// This is a client program; it never runs inside PostgreSQL.
#include <libpq-fe.h>

#include <sys/epoll.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace
{

using Clock = std::chrono::steady_clock;

struct Session {
    PGconn *conn = nullptr;
    Clock::time_point next;
    bool busy = false;
};

double CpuSeconds(bool user)
{
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    const timeval &tv = user ? ru.ru_utime : ru.ru_stime;
    return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6;
}

// Opens every session: PQconnectStart/PQconnectPoll, at most 64 in flight.
bool ConnectAll(std::vector<Session> &sessions, const std::vector<std::string> &conninfos)
{
    size_t started = 0, done = 0, next_info = 0;
    std::vector<PostgresPollingStatusType> poll(sessions.size(), PGRES_POLLING_WRITING);
    while (done < sessions.size()) {
        while (started < sessions.size() && started - done < 64) {
            sessions[started].conn = PQconnectStart(conninfos[next_info].c_str());
            next_info = (next_info + 1) % conninfos.size();
            if (sessions[started].conn == nullptr ||
                PQstatus(sessions[started].conn) == CONNECTION_BAD) {
                std::fprintf(stderr, "checkloop: cannot start a connection\n");
                return false;
            }
            started++;
        }
        int ep = epoll_create1(0);
        for (size_t i = done; i < started; i++) {
            epoll_event ev{};
            ev.events = poll[i] == PGRES_POLLING_READING ? EPOLLIN : EPOLLOUT;
            ev.data.u64 = i;
            epoll_ctl(ep, EPOLL_CTL_ADD, PQsocket(sessions[i].conn), &ev);
        }
        epoll_event ready[64];
        int n = epoll_wait(ep, ready, 64, 1000);
        for (int k = 0; k < n; k++) {
            size_t i = ready[k].data.u64;
            poll[i] = PQconnectPoll(sessions[i].conn);
            if (poll[i] == PGRES_POLLING_FAILED) {
                std::fprintf(stderr, "checkloop: %s", PQerrorMessage(sessions[i].conn));
                return false;
            }
        }
        close(ep);
        // Sessions complete in any order: move the finished ones to the front.
        for (size_t i = done; i < started; i++) {
            if (poll[i] == PGRES_POLLING_OK) {
                std::swap(sessions[i], sessions[done]);
                std::swap(poll[i], poll[done]);
                PQsetnonblocking(sessions[done].conn, 1);
                done++;
            }
        }
    }
    return true;
}

} // namespace

int main(int argc, char **argv)
{
    std::vector<std::string> conninfos;
    std::string sql;
    int nodes = 0, interval_ms = 5000, grid_ms = 0;
    double seconds = 30;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i], v = argv[i + 1];
        if (a == "--conninfo")
            conninfos.push_back(v);
        else if (a == "--nodes")
            nodes = std::atoi(v.c_str());
        else if (a == "--interval-ms")
            interval_ms = std::atoi(v.c_str());
        else if (a == "--sql")
            sql = v;
        else if (a == "--grid-ms")
            grid_ms = std::atoi(v.c_str());
        else if (a == "--seconds")
            seconds = std::atof(v.c_str());
        else {
            std::fprintf(stderr, "checkloop: unknown option %s\n", a.c_str());
            return 2;
        }
    }
    if (conninfos.empty() || nodes < 1 || sql.empty() || interval_ms < 1) {
        std::fprintf(stderr, "usage: checkloop --conninfo STR... --nodes N --interval-ms MS "
                             "--sql SQL --seconds S\n");
        return 2;
    }
    std::vector<Session> sessions(static_cast<size_t>(nodes));
    if (!ConnectAll(sessions, conninfos))
        return 1;

    int ep = epoll_create1(0);
    auto start = Clock::now();
    for (size_t i = 0; i < sessions.size(); i++) {
        // Spread evenly, on a grid of grid_ms (like pg_peerpool's phases): the checks due at
        // one grid point go out on one wake-up.
        long long offset_us =
            static_cast<long long>(interval_ms) * 1000 * static_cast<long long>(i) / nodes;
        if (grid_ms > 0)
            offset_us -= offset_us % (static_cast<long long>(grid_ms) * 1000);
        sessions[i].next = start + std::chrono::microseconds(offset_us);
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = i;
        epoll_ctl(ep, EPOLL_CTL_ADD, PQsocket(sessions[i].conn), &ev);
    }
    // Sessions in the order of their next check: the schedule is a ring.
    size_t cursor = 0;
    long checks = 0, failed = 0;
    auto settle = start + std::chrono::milliseconds(interval_ms);
    auto end = settle + std::chrono::microseconds(static_cast<long long>(seconds * 1e6));
    bool measuring = false;
    double user0 = 0, sys0 = 0;
    std::vector<epoll_event> ready(256);
    for (;;) {
        auto now = Clock::now();
        if (!measuring && now >= settle) {
            measuring = true;
            user0 = CpuSeconds(true);
            sys0 = CpuSeconds(false);
            checks = failed = 0;
        }
        if (now >= end)
            break;
        // Send every check that is due.
        for (size_t sent = 0; sent < sessions.size(); sent++) {
            Session &s = sessions[cursor];
            if (s.next > now)
                break;
            s.next += std::chrono::milliseconds(interval_ms);
            cursor = (cursor + 1) % sessions.size();
            if (s.busy) { // the last answer has not come: count it, do not pile up
                failed++;
                continue;
            }
            if (PQsendQuery(s.conn, sql.c_str()) == 0 || PQflush(s.conn) < 0) {
                failed++;
                continue;
            }
            s.busy = true;
        }
        auto wake = sessions[cursor].next;
        long timeout_ms =
            std::chrono::duration_cast<std::chrono::milliseconds>(wake - Clock::now()).count();
        if (timeout_ms < 0)
            timeout_ms = 0;
        int n = epoll_wait(ep, ready.data(), static_cast<int>(ready.size()),
                           static_cast<int>(timeout_ms) + 1);
        for (int k = 0; k < n; k++) {
            Session &s = sessions[ready[k].data.u64];
            if (PQconsumeInput(s.conn) == 0) {
                std::fprintf(stderr, "checkloop: %s", PQerrorMessage(s.conn));
                return 1;
            }
            while (!PQisBusy(s.conn)) {
                PGresult *res = PQgetResult(s.conn);
                if (res == nullptr) {
                    s.busy = false;
                    checks++;
                    break;
                }
                ExecStatusType st = PQresultStatus(res);
                if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
                    failed++;
                PQclear(res);
            }
        }
    }
    double wall = seconds;
    std::printf("checks=%ld failed=%ld cpu_user_pct=%.2f cpu_sys_pct=%.2f\n", checks, failed,
                100 * (CpuSeconds(true) - user0) / wall, 100 * (CpuSeconds(false) - sys0) / wall);
    for (Session &s : sessions)
        PQfinish(s.conn);
    return 0;
}
