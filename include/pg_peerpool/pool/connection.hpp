// One non-blocking libpq connection to a node, driven by the pool manager's event loop.
// Nothing here blocks: connections open with PQconnectStartParams/PQconnectPoll, queries go
// out with PQsendQuery and come back through PQconsumeInput/PQisBusy/PQgetResult.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "libpq-fe.h"

extern "C" {
#include "postgres.h"
#include "datatype/timestamp.h"
}

#include "pg_peerpool/pool/conninfo.hpp"

namespace peerpool {

enum ConnState {
    CONN_STATE_CONNECTING, // PQconnectPoll in progress
    CONN_STATE_IDLE,       // ready, in the pool
    CONN_STATE_CHECKING,   // running one of our own queries (check, cancel, cleanup)
    CONN_STATE_BUSY,       // running a caller's query, results streamed (single-row mode)
    CONN_STATE_BROKEN,     // failed; to be discarded
};

// Result of Connection::Pump (a caller's query).
enum PumpStatus {
    PUMP_NEED_INPUT, // nothing more without reading the socket
    PUMP_PAUSED,     // the sink is full; call again once it drained (socket not watched)
    PUMP_DONE,       // the query is complete; the connection is idle again (or broken)
};

// What a finished query produced.
struct QueryOutcome {
    bool ok = false;
    std::string error;                          // when !ok (libpq's message, one line)
    std::string sqlstate;                       // when the server sent one
    std::vector<std::vector<std::string>> rows; // text values ("" for NULL, see nulls)
    std::vector<std::vector<bool>> nulls;
};

// Told when what a connection waits for on its socket may have changed (WaitEvents, the
// socket, socket_epoch): the pool manager then re-registers only that node's sockets instead of
// asking every connection of the fleet on every wake-up.
class InterestListener {
public:
    virtual void InterestChanged() = 0;

protected:
    ~InterestListener() = default;
};

class Connection {
public:
    // Starts connecting. On immediate failure returns a connection in CONN_STATE_BROKEN with
    // error() set. Requires an external FD slot (AcquireExternalFD) already taken by caller.
    Connection(uint64 id, const ConnOptions &options, TimestampTz now, TimestampTz deadline);
    // A connection that waits for its host names to be resolved (CONN_STATE_CONNECTING with
    // no libpq connection yet, see resolver.hpp); BeginConnect starts it.
    Connection(uint64 id, TimestampTz now, TimestampTz deadline, ConnOptions unresolved);
    void BeginConnect(const ConnOptions &options);
    bool resolving() const { return resolving_; }
    ConnOptions &unresolved_options() { return unresolved_; }
    ~Connection();
    Connection(const Connection &) = delete;
    Connection &operator=(const Connection &) = delete;

    uint64 id() const { return id_; }
    // Changes whenever libpq may have replaced the socket (while connecting).
    uint32 socket_epoch() const { return poll_calls_; }
    ConnState state() const { return state_; }
    pgsocket socket() const;
    // WL_SOCKET_* events to wait for (0: none).
    uint32 WaitEvents() const;
    uint32 WaitEvents(pgsocket &sock) const; // also returns socket(), in one libpq call

    void set_listener(InterestListener *listener) { listener_ = listener; }

    // Advances the connection after its socket fired (or a timer). Returns true when the
    // state changed in a way the owner must look at (connected, broken, query finished).
    bool OnSocketReady();

    bool SendQuery(const std::string &sql, TimestampTz now, TimestampTz deadline);

    // A caller's query: results come one row at a time (single-row mode) through Pump.
    bool SendUserQuery(const std::string &sql, TimestampTz now);
    // Hands each ready result to `sink` (which must PQclear it or keep it). When sink returns
    // false, stops with PUMP_PAUSED. Reads the socket first when `read_socket`.
    template <typename Sink> PumpStatus Pump(Sink &&sink, bool read_socket);
    int backend_pid() const { return conn_ ? PQbackendPID(conn_) : 0; }
    // What PQcancel needs to cancel this session's query (caller frees), or null.
    PGcancel *GetCancel() const { return conn_ ? PQgetCancel(conn_) : nullptr; }
    PGTransactionStatusType transaction_status() const
    {
        return conn_ ? PQtransactionStatus(conn_) : PQTRANS_UNKNOWN;
    }
    // Valid once a query finished (state back to IDLE or BROKEN).
    bool query_finished() const { return query_finished_; }
    QueryOutcome TakeOutcome();

    void MarkBroken(const std::string &why);
    // For an idle connection: reads whatever the server sent meanwhile (without waiting) and
    // returns false, marking it broken, if the session has ended.
    // Without `read_socket`, only what was already read counts (no system call): enough where
    // a dead session costs nothing but a retry (a health check, see Node::StartCheck).
    bool StillAlive(bool read_socket = true);
    void MarkIdle(TimestampTz now);

    const std::string &error() const { return error_; }
    TimestampTz created_at() const { return created_at_; }
    TimestampTz connected_at() const { return connected_at_; }
    TimestampTz last_used() const { return last_used_; }
    TimestampTz deadline() const { return deadline_; }
    TimestampTz query_started() const { return query_started_; }
    bool ever_connected() const { return connected_at_ != 0; }
    bool recycle_requested = false;  // close at the next return to the pool
    bool counted_connecting = false; // counted in the fleet's attempts in flight
    // The node's conninfo was set by a non-superuser (SPEC section 2): the server reached must
    // have authenticated us with the conninfo's password, or the connection is closed as soon
    // as it is established, before anything is sent on it.
    bool require_password = false;
    // SQLSTATE of a failure we diagnosed ourselves (28000 for the password rule), else "".
    const std::string &error_sqlstate() const { return error_sqlstate_; }

    // Notices the server sent; drained by the owner into the server log.
    std::vector<std::string> TakeNotices();

    // When the first byte waiting unread in the socket reached this host, as the kernel
    // stamped it (TCP: SO_TIMESTAMPNS, read with MSG_PEEK, so libpq still reads it); 0 when
    // unknown (nothing waiting, a Unix socket, an older kernel). A check's latency is measured
    // to this arrival, not to when the pool manager got the CPU to read it: on a busy host our
    // own scheduling delay is not the node's latency (SPEC section 3).
    TimestampTz PeekArrival() const;

private:
    static void NoticeReceiver(void *arg, const PGresult *res);
    // Called at the end of every method that may change WaitEvents/socket/socket_epoch: tells
    // the listener if they did.
    void Reconsider();
    template <typename Sink> PumpStatus PumpResults(Sink &&sink, bool read_socket);
    bool Start(const std::string &sql, TimestampTz now, ConnState running);
    bool StartQuery(const std::string &sql, TimestampTz now, ConnState running);
    bool Advance(); // OnSocketReady without Reconsider
    bool ReadResults();

    uint64 id_;
    PGconn *conn_ = nullptr;
    ConnState state_ = CONN_STATE_CONNECTING;
    PostgresPollingStatusType poll_ = PGRES_POLLING_WRITING;
    bool flush_pending_ = false;
    bool paused_ = false;
    uint32 poll_calls_ = 0;
    bool query_finished_ = false;
    QueryOutcome outcome_;
    std::string error_;
    std::string error_sqlstate_;
    TimestampTz created_at_ = 0;
    TimestampTz connected_at_ = 0;
    TimestampTz last_used_ = 0;
    TimestampTz deadline_ = 0;
    TimestampTz query_started_ = 0;
    std::vector<std::string> notices_;
    uint64 notices_dropped_ = 0;
    bool resolving_ = false;
    bool fatal_received_ = false; // the server sent FATAL/PANIC (as a notice, while idle)
    ConnOptions unresolved_;      // while resolving_: the options before name resolution
    InterestListener *listener_ = nullptr;
    pgsocket reported_socket_ = PGINVALID_SOCKET; // as last told to listener_
    uint32 reported_events_ = 0;
    uint32 reported_epoch_ = 0;
    mutable int peek_errno_ = 0; // a socket error PeekArrival took from the kernel
};

// Bounds on what a peer's notices may cost us per query (memory held, lines logged).
constexpr size_t kMaxNotices = 20;
constexpr size_t kMaxNoticeBytes = 1024;

// libpq's message as one line without the trailing newline.
std::string OneLine(const char *message);

// An error result that libpq made up itself (no SQLSTATE from the server): lost
// synchronisation, an unexpected message, out of memory. The connection cannot be trusted.
inline bool IsClientSideError(const PGresult *res)
{
    ExecStatusType st = PQresultStatus(res);
    return (st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE) &&
           PQresultErrorField(res, PG_DIAG_SQLSTATE) == nullptr;
}

template <typename Sink> PumpStatus Connection::Pump(Sink &&sink, bool read_socket)
{
    PumpStatus status = PumpResults(std::forward<Sink>(sink), read_socket);
    Reconsider();
    return status;
}

template <typename Sink> PumpStatus Connection::PumpResults(Sink &&sink, bool read_socket)
{
    if (state_ != CONN_STATE_BUSY)
        return PUMP_DONE;
    paused_ = false;
    if (read_socket) {
        if (flush_pending_) {
            int rc = PQflush(conn_);
            if (rc < 0) {
                MarkBroken(OneLine(PQerrorMessage(conn_)));
                return PUMP_DONE;
            }
            flush_pending_ = rc == 1;
        }
        if (PQconsumeInput(conn_) == 0) {
            MarkBroken(OneLine(PQerrorMessage(conn_)));
            return PUMP_DONE;
        }
    }
    while (!PQisBusy(conn_)) {
        PGresult *res = PQgetResult(conn_);
        if (res == nullptr) {
            if (PQstatus(conn_) == CONNECTION_BAD)
                MarkBroken(OneLine(PQerrorMessage(conn_)));
            else
                state_ = CONN_STATE_IDLE;
            return PUMP_DONE;
        }
        if (IsClientSideError(res)) {
            // libpq's own verdict (a message it did not expect): the session is out of step
            // with the server and would wait for a ReadyForQuery that never comes.
            MarkBroken("protocol error: " + OneLine(PQresultErrorMessage(res)));
            PQclear(res);
            return PUMP_DONE;
        }
        if (!sink(res)) {
            paused_ = true;
            return PUMP_PAUSED;
        }
    }
    return PUMP_NEED_INPUT;
}

// The options the pool manager connects with: the node's conninfo plus our defaults
// (application_name, TCP keepalives, tcp_user_timeout) where the conninfo does not say.
ConnOptions ConnectionOptions(const std::string &conninfo, const std::string &application_name,
                              int tcp_user_timeout_ms);

} // namespace peerpool
