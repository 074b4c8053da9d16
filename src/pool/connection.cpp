// Non-blocking libpq connections for the pool manager's event loop.
#include "pg_peerpool/pool/connection.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <sys/socket.h>
#include <sys/uio.h>

#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "mb/pg_wchar.h"
#include "storage/fd.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
}

namespace peerpool {

std::string OneLine(const char *message)
{
    std::string s = message ? message : "";
    while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
        s.pop_back();
    std::string out;
    for (char c : s) {
        if (c == '\n' || c == '\t')
            c = ' ';
        if (c == ' ' && !out.empty() && out.back() == ' ')
            continue;
        out.push_back(c);
    }
    return out;
}

ConnOptions ConnectionOptions(const std::string &conninfo, const std::string &application_name,
                              int tcp_user_timeout_ms)
{
    ConnOptions options = ParseConninfo(conninfo);
    auto has = [&](const char *key) {
        return std::any_of(options.begin(), options.end(),
                           [&](const auto &kv) { return kv.first == key; });
    };
    if (!has("application_name") && !application_name.empty())
        options.emplace_back("application_name", application_name);
    // Dead peers that send nothing (no RST) must be found by the kernel too (SPEC section 3).
    if (!has("keepalives"))
        options.emplace_back("keepalives", "1");
    if (!has("keepalives_idle"))
        options.emplace_back("keepalives_idle", "10");
    if (!has("keepalives_interval"))
        options.emplace_back("keepalives_interval", "5");
    if (!has("keepalives_count"))
        options.emplace_back("keepalives_count", "3");
    if (!has("tcp_user_timeout"))
        options.emplace_back("tcp_user_timeout", std::to_string(tcp_user_timeout_ms));
    // Like dblink and postgres_fdw: the peer converts everything to this database's encoding
    // (or fails the query with 22P05), whatever the conninfo says. Requests carry their
    // caller's encoding and are refused if it differs (request.cpp). Cannot error.
    options.erase(std::remove_if(options.begin(), options.end(),
                                 [](const auto &kv) { return kv.first == "client_encoding"; }),
                  options.end());
    options.emplace_back("client_encoding", GetDatabaseEncodingName());
    // Like postgres_fdw: values travel as text, so fix the formats that vary by setting.
    const char *formats = "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3";
    auto opt = std::find_if(options.begin(), options.end(),
                            [](const auto &kv) { return kv.first == "options"; });
    if (opt == options.end())
        options.emplace_back("options", formats);
    else
        opt->second = std::string(formats) + " " + opt->second; // the conninfo's own win
    return options;
}

Connection::Connection(uint64 id, const ConnOptions &options, TimestampTz now, TimestampTz deadline)
    : id_(id), created_at_(now), last_used_(now), deadline_(deadline)
{
    BeginConnect(options);
}

Connection::Connection(uint64 id, TimestampTz now, TimestampTz deadline, ConnOptions unresolved)
    : id_(id), created_at_(now), last_used_(now), deadline_(deadline), resolving_(true),
      unresolved_(std::move(unresolved))
{
}

void Connection::BeginConnect(const ConnOptions &options)
{
    resolving_ = false;
    unresolved_.clear();
    poll_calls_++; // a socket appears: the wait set must be rebuilt
    std::vector<const char *> keys;
    std::vector<const char *> values;
    for (const auto &[k, v] : options) {
        keys.push_back(k.c_str());
        values.push_back(v.c_str());
    }
    keys.push_back(nullptr);
    values.push_back(nullptr);
    conn_ = PQconnectStartParams(keys.data(), values.data(), 0);
    if (conn_ == nullptr) {
        MarkBroken("out of memory");
        return;
    }
    PQsetNoticeReceiver(conn_, &Connection::NoticeReceiver, this);
    if (PQstatus(conn_) == CONNECTION_BAD)
        MarkBroken(OneLine(PQerrorMessage(conn_)));
    Reconsider();
}

Connection::~Connection()
{
    // PQfinish on a non-blocking connection does not wait for the peer.
    if (conn_ != nullptr)
        PQfinish(conn_);
}

pgsocket Connection::socket() const { return conn_ ? PQsocket(conn_) : PGINVALID_SOCKET; }

uint32 Connection::WaitEvents() const
{
    pgsocket sock;
    return WaitEvents(sock);
}

uint32 Connection::WaitEvents(pgsocket &sock) const
{
    sock = conn_ ? PQsocket(conn_) : PGINVALID_SOCKET;
    if (sock == PGINVALID_SOCKET)
        return 0;
    switch (state_) {
    case CONN_STATE_CONNECTING:
        return poll_ == PGRES_POLLING_READING ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE;
    case CONN_STATE_IDLE:
        return WL_SOCKET_READABLE; // a server closing on us (EOF, FATAL) is seen at once
    case CONN_STATE_CHECKING:
        return WL_SOCKET_READABLE | (flush_pending_ ? WL_SOCKET_WRITEABLE : 0);
    case CONN_STATE_BUSY:
        // Paused: the caller has not read what we sent yet; leave the rest in the kernel so the
        // peer feels the backpressure.
        return paused_ ? 0 : WL_SOCKET_READABLE | (flush_pending_ ? WL_SOCKET_WRITEABLE : 0);
    case CONN_STATE_BROKEN:
        return 0;
    }
    return 0;
}

void Connection::Reconsider()
{
    if (listener_ == nullptr)
        return;
    pgsocket sock;
    uint32 events = WaitEvents(sock);
    if (sock == reported_socket_ && events == reported_events_ && poll_calls_ == reported_epoch_)
        return;
    reported_socket_ = sock;
    reported_events_ = events;
    reported_epoch_ = poll_calls_;
    listener_->InterestChanged();
}

void Connection::NoticeReceiver(void *arg, const PGresult *res)
{
    // Called from inside libpq: must not throw or ereport. A peer may send any number of
    // notices of any size: keep kMaxNotices until the owner logs them (after each query), each cut
    // to kMaxNoticeBytes (at a UTF-8 boundary), and only count the rest.
    auto *self = static_cast<Connection *>(arg);
    // A FATAL that arrives while the session is idle (idle_session_timeout,
    // pg_terminate_backend) comes to us as a notice, before the server closes the socket: the
    // session is over even though libpq still says CONNECTION_OK (see StillAlive).
    const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    if (severity != nullptr && (strcmp(severity, "FATAL") == 0 || strcmp(severity, "PANIC") == 0))
        self->fatal_received_ = true;
    try {
        if (self->notices_.size() >= kMaxNotices) {
            self->notices_dropped_++;
            return;
        }
        const char *message = PQresultErrorMessage(res);
        size_t len = strnlen(message, kMaxNoticeBytes + 1);
        std::string text(message, len);
        if (len > kMaxNoticeBytes) {
            size_t n = kMaxNoticeBytes;
            while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80)
                n--;
            text.resize(n);
            text += " [cut]";
        }
        self->notices_.push_back(OneLine(text.c_str()));
    } catch (...) {
    }
}

std::vector<std::string> Connection::TakeNotices()
{
    std::vector<std::string> out;
    out.swap(notices_);
    if (notices_dropped_ > 0) {
        out.push_back(Format("%llu further notices not logged",
                             static_cast<unsigned long long>(notices_dropped_)));
        notices_dropped_ = 0;
    }
    return out;
}

void Connection::MarkBroken(const std::string &why)
{
    state_ = CONN_STATE_BROKEN;
    if (error_.empty() && peek_errno_ != 0) // libpq saw only the end of the stream after it
        error_ = std::string("could not receive data from server: ") + strerror(peek_errno_);
    if (error_.empty())
        error_ = why.empty() ? "connection lost" : why;
    Reconsider();
}

bool Connection::StillAlive(bool read_socket)
{
    if (conn_ == nullptr || state_ != CONN_STATE_IDLE)
        return state_ != CONN_STATE_BROKEN;
    if ((read_socket && PQconsumeInput(conn_) == 0) || PQstatus(conn_) == CONNECTION_BAD) {
        MarkBroken(OneLine(PQerrorMessage(conn_)));
        return false;
    }
    if (fatal_received_) {
        MarkBroken("the server ended the session");
        return false;
    }
    while (PGnotify *n = PQnotifies(conn_))
        PQfreemem(n);
    return true;
}

TimestampTz Connection::PeekArrival() const
{
    pgsocket sock = conn_ ? PQsocket(conn_) : PGINVALID_SOCKET;
    if (sock == PGINVALID_SOCKET)
        return 0;
    char byte;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(timespec))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t got = recvmsg(sock, &msg, MSG_PEEK | MSG_DONTWAIT);
    if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
        peek_errno_ = errno; // the kernel hands a socket error out once: keep it (MarkBroken)
    if (got <= 0)
        return 0;
    for (cmsghdr *h = CMSG_FIRSTHDR(&msg); h != nullptr; h = CMSG_NXTHDR(&msg, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_TIMESTAMPNS)
            continue;
        timespec ts;
        memcpy(&ts, CMSG_DATA(h), sizeof(ts));
        // Unix epoch to PostgreSQL's (TimestampTz is microseconds since 2000-01-01).
        return static_cast<TimestampTz>(ts.tv_sec -
                                        (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY) *
                   USECS_PER_SEC +
               ts.tv_nsec / 1000;
    }
    return 0;
}

void Connection::MarkIdle(TimestampTz now)
{
    state_ = CONN_STATE_IDLE;
    last_used_ = now;
    Reconsider();
}

bool Connection::OnSocketReady()
{
    bool changed = Advance();
    Reconsider();
    return changed;
}

bool Connection::Advance()
{
    if (conn_ == nullptr || state_ == CONN_STATE_BROKEN)
        return false;
    switch (state_) {
    case CONN_STATE_CONNECTING: {
        PostgresPollingStatusType before = poll_;
        // libpq may close the socket and open another (next host or address, SSL/GSS
        // fallback) that gets the same fd number: the wait set must be rebuilt regardless.
        poll_calls_++;
        poll_ = PQconnectPoll(conn_);
        if (poll_ == PGRES_POLLING_OK) {
            // Checked on the server actually reached: with several hosts, libpq may have
            // fallen through to one that did not ask for the password (CVE-2018-10915).
            if (require_password && !PQconnectionUsedPassword(conn_)) {
                PQfinish(conn_);
                conn_ = nullptr;
                error_sqlstate_ = "28000";
                MarkBroken("password is required: the server did not authenticate this "
                           "connection with the conninfo's password, and the node's conninfo "
                           "was set by a role that is not a superuser. HINT: Have the server "
                           "require password authentication (e.g. scram-sha-256) for this "
                           "user, or have a superuser set the conninfo.");
                return true;
            }
            if (PQsetnonblocking(conn_, 1) != 0) {
                MarkBroken(OneLine(PQerrorMessage(conn_)));
                return true;
            }
            state_ = CONN_STATE_IDLE;
            connected_at_ = last_used_ = GetCurrentTimestamp(); // gettimeofday: cannot error
            // The socket is final now: ask the kernel to stamp what arrives (PeekArrival).
            // Best effort; a socket that cannot (AF_UNIX) simply yields no stamps.
            int on = 1;
            (void)setsockopt(PQsocket(conn_), SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof(on));
            return true;
        }
        if (poll_ == PGRES_POLLING_FAILED) {
            MarkBroken(OneLine(PQerrorMessage(conn_)));
            return true;
        }
        (void)before;
        return true; // the socket or direction may have changed
    }
    case CONN_STATE_IDLE:
        if (PQconsumeInput(conn_) == 0 || PQstatus(conn_) == CONNECTION_BAD) {
            MarkBroken(OneLine(PQerrorMessage(conn_)));
            return true;
        }
        while (PGnotify *n = PQnotifies(conn_))
            PQfreemem(n);
        return false;
    case CONN_STATE_CHECKING: {
        if (flush_pending_) {
            int rc = PQflush(conn_);
            if (rc < 0) {
                MarkBroken(OneLine(PQerrorMessage(conn_)));
                query_finished_ = true;
                outcome_.ok = false;
                outcome_.error = error_;
                return true;
            }
            flush_pending_ = rc == 1;
        }
        if (PQconsumeInput(conn_) == 0) {
            MarkBroken(OneLine(PQerrorMessage(conn_)));
            query_finished_ = true;
            outcome_.ok = false;
            outcome_.error = error_;
            return true;
        }
        return ReadResults();
    }
    case CONN_STATE_BUSY:
        return true; // the owner pumps it
    case CONN_STATE_BROKEN:
        return false;
    }
    return false;
}

bool Connection::SendUserQuery(const std::string &sql, TimestampTz now)
{
    // Rows arrive one by one: the pool manager never holds a whole result set.
    return Start(sql, now, CONN_STATE_BUSY);
}

// Drains every result that is ready. Returns true when the query is complete.
bool Connection::ReadResults()
{
    while (!PQisBusy(conn_)) {
        PGresult *res = PQgetResult(conn_);
        if (res == nullptr) {
            query_finished_ = true;
            if (PQstatus(conn_) == CONNECTION_BAD) {
                MarkBroken(OneLine(PQerrorMessage(conn_)));
                if (outcome_.error.empty()) {
                    outcome_.ok = false;
                    outcome_.error = error_;
                }
            } else {
                state_ = CONN_STATE_IDLE;
                last_used_ = GetCurrentTimestamp();
                // A connection left inside a transaction is not clean: discard it.
                if (PQtransactionStatus(conn_) != PQTRANS_IDLE)
                    MarkBroken("connection left inside a transaction");
            }
            return true;
        }
        std::unique_ptr<PGresult, decltype(&PQclear)> guard(res, &PQclear);
        ExecStatusType status = PQresultStatus(res);
        if (IsClientSideError(res)) {
            MarkBroken("protocol error: " + OneLine(PQresultErrorMessage(res)));
            query_finished_ = true;
            outcome_.ok = false;
            outcome_.error = error_;
            return true;
        }
        if (status == PGRES_COPY_IN || status == PGRES_COPY_OUT || status == PGRES_COPY_BOTH) {
            // COPY never ends by reading results: this connection is done for.
            MarkBroken("COPY is not supported on pool connections");
            query_finished_ = true;
            outcome_.ok = false;
            outcome_.error = error_;
            return true;
        }
        if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK) {
            outcome_.ok = outcome_.error.empty();
            int nrows = PQntuples(res), ncols = PQnfields(res);
            for (int r = 0; r < nrows; r++) {
                std::vector<std::string> row;
                std::vector<bool> nulls;
                for (int c = 0; c < ncols; c++) {
                    nulls.push_back(PQgetisnull(res, r, c) != 0);
                    row.emplace_back(PQgetvalue(res, r, c));
                }
                outcome_.rows.push_back(std::move(row));
                outcome_.nulls.push_back(std::move(nulls));
            }
        } else {
            outcome_.ok = false;
            outcome_.error = OneLine(PQresultErrorMessage(res));
            const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            outcome_.sqlstate = state ? state : "";
        }
    }
    return false;
}

bool Connection::SendQuery(const std::string &sql, TimestampTz now, TimestampTz deadline)
{
    deadline_ = deadline;
    return Start(sql, now, CONN_STATE_CHECKING);
}

bool Connection::Start(const std::string &sql, TimestampTz now, ConnState running)
{
    bool ok = StartQuery(sql, now, running);
    Reconsider();
    return ok;
}

bool Connection::StartQuery(const std::string &sql, TimestampTz now, ConnState running)
{
    outcome_ = QueryOutcome();
    query_finished_ = false;
    query_started_ = now;
    last_used_ = now;
    paused_ = false;
    if (PQsendQuery(conn_, sql.c_str()) == 0) {
        MarkBroken(OneLine(PQerrorMessage(conn_)));
        return false;
    }
    if (running == CONN_STATE_BUSY)
        PQsetSingleRowMode(conn_);
    state_ = running;
    int rc = PQflush(conn_);
    if (rc < 0) {
        MarkBroken(OneLine(PQerrorMessage(conn_)));
        return false;
    }
    flush_pending_ = rc == 1;
    return true;
}

QueryOutcome Connection::TakeOutcome()
{
    QueryOutcome out = std::move(outcome_);
    outcome_ = QueryOutcome();
    query_finished_ = false;
    return out;
}

} // namespace peerpool
