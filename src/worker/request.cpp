// A caller's parallel_query / pool_query inside the pool manager (see request.hpp).
//
// Memory bound: rows are read one at a time (single-row mode) and queued for the caller; once
// kOutboxLimit bytes wait in the queue the task stops reading its socket, so the peer's TCP
// window -- not our memory -- absorbs a large result. The bound per request is kOutboxLimit
// plus the largest single row.
#include "pg_peerpool/worker/request.hpp"

#include <set>

#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/routing.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "mb/pg_wchar.h"
#include "storage/proc.h"
#include "storage/spin.h"
#include "utils/elog.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
}

namespace peerpool {

namespace {

constexpr size_t kOutboxLimit = 256 * 1024;
// Rows are published to the caller in batches of about half the response queue; answers
// ('D'), failures ('X') and the end ('E') at once. A small result thus wakes the caller once.
constexpr size_t kPublishBytes = kResponseQueueSize / 2;
// The largest message the response queue carries: the caller pallocs each one (MaxAllocSize).
// A row that would exceed it fails its node with 54000 instead of reaching shm_mq_send.
constexpr size_t kMaxMessageBytes = MaxAllocSize;

std::string SqlState(int sqlerrcode)
{
    // unpack_sql_state only formats into a static buffer.
    return unpack_sql_state(sqlerrcode);
}

// A caller-supplied name for a message: in double quotes, with quotes doubled and control
// characters escaped, so that a name cannot forge a line of the client's output.
std::string QuoteName(const std::string &name)
{
    std::string out = "\"";
    for (unsigned char ch : name) {
        if (ch == '"')
            out += "\"\"";
        else if (ch < 0x20 || ch == 0x7f)
            out += Format("\\x%02x", ch);
        else
            out.push_back(static_cast<char>(ch));
    }
    out += "\"";
    return out;
}

std::string ResultField(const PGresult *res, int field)
{
    const char *v = PQresultErrorField(res, field);
    return v ? v : "";
}

} // namespace

Request::Request(RequestHost &host, int slot, uint64 key, TimestampTz now)
    : host_(host), slot_(slot), key_(key), started_(now)
{
    RequestSlot *s = GetRequestSlot(slot_);
    // The handles live in a context of their own (the loop's scratch context is reset every
    // wake), released by deleting it: see ~Request.
    pg::Call([&] {
        context_ = AllocSetContextCreate(TopMemoryContext, "pg_peerpool request",
                                         ALLOCSET_SMALL_SIZES);
        MemoryContext old = MemoryContextSwitchTo(context_);
        in_ = shm_mq_attach(SlotRequestQueue(s), nullptr, nullptr);
        out_ = shm_mq_attach(SlotResponseQueue(s), nullptr, nullptr);
        MemoryContextSwitchTo(old);
    });
    SpinLockAcquire(&s->mutex);
    s->state = REQUEST_SLOT_ACTIVE;
    SpinLockRelease(&s->mutex);
}

Request::~Request()
{
    // Not shm_mq_detach: that would set the caller's latch for nothing (it has read all it
    // needs, or it left). The queues are created afresh for the slot's next request.
    // MemoryContextDelete only frees memory: it cannot error.
    if (context_ != nullptr)
        MemoryContextDelete(context_);
    RequestSlot *s = GetRequestSlot(slot_);
    SpinLockAcquire(&s->mutex);
    s->state = REQUEST_SLOT_FREE;
    SpinLockRelease(&s->mutex);
    // The slot's owner may already wait to send its next request (slot index = PGPROC number).
    SetLatch(&ProcGlobal->allProcs[slot_].procLatch);
}

void Request::Step(TimestampTz now)
{
    if (finished_)
        return;
    if (!launched_) {
        Size len = 0;
        void *data = nullptr;
        shm_mq_handle *in = in_;
        shm_mq_result r = pg::Call([&] { return shm_mq_receive(in, &len, &data, true); });
        if (r == SHM_MQ_WOULD_BLOCK)
            return;
        if (r == SHM_MQ_DETACHED) {
            Abandon(now);
            return;
        }
        if (!protocol::DecodeRequest(static_cast<const char *>(data), len, request_)) {
            Fail(ERRCODE_PROTOCOL_VIOLATION, "malformed request from backend", "");
        } else {
            Launch(now);
        }
    }

    bool timed_out = deadline_ != 0 && now >= deadline_ && !timed_out_;
    if (timed_out) {
        timed_out_ = true;
        // Waiting tasks leave their queues first: aborting a running one frees a connection
        // that must not start another task of this (timed-out) request.
        for (size_t i = 0; i < tasks_.size(); i++)
            if (tasks_[i].state == TASK_WAITING)
                if (Node *node = host_.FindNode(tasks_[i].node))
                    node->CancelWait({key_, static_cast<int>(i)});
    }
    for (size_t i = 0; i < tasks_.size() && !abandoned_; i++) {
        Task &t = tasks_[i];
        if (t.state == TASK_DONE)
            continue;
        Node *node = host_.FindNode(t.node);
        if (timed_out) {
            if (node != nullptr) {
                if (t.state == TASK_WAITING)
                    node->CancelWait({key_, static_cast<int>(i)});
                else
                    node->AbortLease(t.conn_id, now);
            }
            // Rows of this node still queued here would only delay the answer behind them.
            DropQueuedRows(static_cast<int>(i));
            FinishTask(static_cast<int>(i), false, SqlState(ERRCODE_QUERY_CANCELED),
                       Format("timeout: node \"%s\" did not answer within %d ms", t.node.c_str(),
                              request_.timeout_ms),
                       now);
            continue;
        }
        if (t.state == TASK_RUNNING && t.paused && outbox_bytes_ < kOutboxLimit &&
            node != nullptr) {
            Connection *conn = node->LeasedConnection(t.conn_id);
            if (conn != nullptr)
                Pump(static_cast<int>(i), *node, *conn, false, now);
        }
    }
    Flush();
    if (!end_queued_) {
        QueueEndIfDone(); // a request with no targets at all
        Flush();
    }
    if ((end_queued_ && outbox_.empty()) || abandoned_)
        finished_ = true;
}

void Request::Launch(TimestampTz now)
{
    launched_ = true;
    if (request_.timeout_ms > 0)
        deadline_ = TimestampTzPlusMilliseconds(started_, request_.timeout_ms);
    if (request_.acquire_timeout_ms > 0)
        acquire_deadline_ = TimestampTzPlusMilliseconds(started_, request_.acquire_timeout_ms);

    // Pooled connections use this database's encoding as client_encoding (connection.cpp):
    // a caller in a database of another encoding would get bytes it cannot use.
    if (request_.encoding != GetDatabaseEncodingName()) {
        Fail(ERRCODE_FEATURE_NOT_SUPPORTED,
             Format("this database's encoding %s differs from the pg_peerpool pool manager's %s",
                    request_.encoding.c_str(), GetDatabaseEncodingName()),
             "Call it from a database with the encoding of peerpool.database.");
        return;
    }
    std::vector<Node *> targets;
    if (request_.kind == protocol::REQUEST_KIND_PARALLEL) {
        if (request_.has_nodes) {
            std::string unknown;
            int unknown_count = 0;
            std::set<std::string> seen;
            for (const std::string &name : request_.nodes) {
                if (!seen.insert(name).second)
                    continue; // a node named twice runs once (SPEC section 5)
                Node *n = host_.FindNode(name);
                if (n == nullptr || n->state() == NODE_STATE_DRAINING) {
                    if (unknown_count < 10)
                        unknown += (unknown.empty() ? "" : ", ") + QuoteName(name);
                    unknown_count++;
                }
                targets.push_back(n);
            }
            if (unknown_count > 10)
                unknown += Format(" and %d more", unknown_count - 10);
            if (unknown_count > 0) {
                Fail(ERRCODE_UNDEFINED_OBJECT,
                     unknown_count == 1 ? Format("node %s does not exist", unknown.c_str())
                                        : Format("nodes %s do not exist", unknown.c_str()),
                     "The registered nodes are listed in peerpool.nodes.");
                return;
            }
        } else {
            for (Node *n : host_.NodesByName())
                if (n->config().enabled && n->state() != NODE_STATE_DRAINING)
                    targets.push_back(n);
        }
    } else {
        RouteResult route = RouteQuery(request_.target, host_.NodesByName(), host_.RoundRobin());
        if (route.node == nullptr) {
            Fail(route.sqlerrcode, route.message, route.detail);
            return;
        }
        targets.push_back(route.node);
    }

    protocol::Writer names('N');
    names.U32(static_cast<uint32_t>(targets.size()));
    for (Node *n : targets) {
        names.Str(n->name());
        Task t;
        t.node = n->name();
        tasks_.push_back(std::move(t));
    }
    Queue(std::move(names.buffer()), false);

    // Tasks are all in place before the first Enqueue: a grant may call back at once.
    for (size_t i = 0; i < targets.size(); i++) {
        Node *n = targets[i];
        std::string why = WhyNotServing(*n, false);
        if (!why.empty()) {
            FinishTask(static_cast<int>(i), false, SqlState(ERRCODE_CONNECTION_FAILURE),
                       Format("node \"%s\" is %s", n->name().c_str(), why.c_str()), now);
            continue;
        }
        n->Enqueue({key_, static_cast<int>(i)}, acquire_deadline_, now);
    }
}

void Request::Fail(int sqlerrcode, const std::string &message, const std::string &detail,
                   const std::string &hint)
{
    protocol::Writer w('X');
    w.Str(SqlState(sqlerrcode)).Str(message).Str(detail).Str(hint);
    Queue(std::move(w.buffer()), true);
    Queue(std::string(1, 'E'), true);
    launched_ = true;
    end_queued_ = true;
}

void Request::FinishTask(int index, bool success, const std::string &sqlstate,
                         const std::string &message, TimestampTz now)
{
    Task &t = tasks_[index];
    if (t.state == TASK_DONE)
        return;
    t.state = TASK_DONE;
    if (abandoned_)
        return;
    double elapsed = static_cast<double>(now - started_) / 1000.0;
    protocol::Writer w('D');
    w.U32(static_cast<uint32_t>(index)).U8(success ? 1 : 0).F64(elapsed);
    w.Str(success ? "" : sqlstate).Str(success ? "" : message);
    w.Str(success ? "" : t.detail).Str(success ? "" : t.hint);
    Queue(std::move(w.buffer()), true);
    // The last answer carries the end marker in the same batch: one wake fewer for the caller.
    QueueEndIfDone();
}

void Request::QueueEndIfDone()
{
    if (!launched_ || end_queued_ || abandoned_)
        return;
    for (const Task &t : tasks_)
        if (t.state != TASK_DONE)
            return;
    Queue(std::string(1, 'E'), true);
    end_queued_ = true;
}

bool Request::OnGrant(int task, Node &, Connection &conn, TimestampTz now)
{
    if (abandoned_ || finished_ || task < 0 || static_cast<size_t>(task) >= tasks_.size() ||
        tasks_[task].state != TASK_WAITING)
        return false;
    Task &t = tasks_[task];
    t.state = TASK_RUNNING;
    t.conn_id = conn.id();
    if (!conn.SendUserQuery(request_.sql, now))
        FinishTask(task, false, SqlState(ERRCODE_CONNECTION_FAILURE),
                   Format("node \"%s\": could not send the query: %s", t.node.c_str(),
                          conn.error().c_str()),
                   now);
    return true;
}

void Request::OnReady(int task, Node &node, Connection &conn, TimestampTz now)
{
    if (task < 0 || static_cast<size_t>(task) >= tasks_.size())
        return;
    Pump(task, node, conn, true, now);
}

void Request::Pump(int index, Node &node, Connection &conn, bool read_socket, TimestampTz now)
{
    Task &t = tasks_[index];
    if (t.state != TASK_RUNNING)
        return;
    PumpStatus status = conn.Pump([&](PGresult *res) { return HandleResult(index, res); },
                                  read_socket);
    t.paused = status == PUMP_PAUSED;
    if (t.too_big) {
        // The node's query goes on without us: cancel it, drop its results, fail the node.
        uint64 conn_id = t.conn_id;
        DropQueuedRows(index);
        FinishTask(index, false, t.sqlstate, t.message, now);
        node.AbortLease(conn_id, now);
        Flush();
        return;
    }
    if (t.copy) {
        uint64 conn_id = t.conn_id;
        FinishTask(index, false, t.sqlstate, t.message, now);
        node.DiscardLease(conn_id); // a connection in COPY state cannot be reused
        Flush();
        return;
    }
    if (status == PUMP_DONE) {
        bool broken = conn.state() == CONN_STATE_BROKEN;
        if (broken && !t.failed) {
            t.failed = true;
            t.sqlstate = SqlState(ERRCODE_CONNECTION_FAILURE);
            t.message = Format("node \"%s\": connection lost: %s", t.node.c_str(),
                               conn.error().c_str());
        }
        bool ok = !t.failed;
        std::string sqlstate = t.sqlstate, message = t.message;
        uint64 conn_id = t.conn_id;
        FinishTask(index, ok, sqlstate, message, now);
        Flush(); // the caller has its answer before the connection's cleanup (reset_query) goes out
        node.ReleaseLease(conn_id, ok, now); // may hand the connection to the next waiter
    }
    Flush();
}

// One result of a caller's query. Returns false to pause reading (the outbox is full).
bool Request::HandleResult(int index, PGresult *res)
{
    Task &t = tasks_[index];
    ExecStatusType status = PQresultStatus(res);
    switch (status) {
    case PGRES_SINGLE_TUPLE:
    case PGRES_TUPLES_OK: {
        int ncols = PQnfields(res);
        if (!t.columns_sent) {
            protocol::Writer w('C');
            w.U32(static_cast<uint32_t>(index)).U32(static_cast<uint32_t>(ncols));
            for (int c = 0; c < ncols; c++)
                w.U32(PQftype(res, c)).Str(PQfname(res, c));
            Queue(std::move(w.buffer()), false);
            t.columns_sent = true;
        }
        for (int r = 0; r < PQntuples(res); r++) {
            size_t bytes = 9 + 4 * static_cast<size_t>(ncols);
            for (int c = 0; c < ncols; c++)
                bytes += static_cast<size_t>(PQgetlength(res, r, c));
            if (bytes > kMaxMessageBytes) {
                if (!t.failed) {
                    t.failed = true;
                    t.sqlstate = SqlState(ERRCODE_PROGRAM_LIMIT_EXCEEDED);
                    t.message = Format("node \"%s\" returned a row of %zu bytes, more than "
                                       "pg_peerpool can pass to the caller (%zu bytes)",
                                       t.node.c_str(), bytes, kMaxMessageBytes);
                }
                t.too_big = true;
                PQclear(res);
                return false;
            }
            protocol::Writer w('R');
            w.U32(static_cast<uint32_t>(index)).U32(static_cast<uint32_t>(ncols));
            for (int c = 0; c < ncols; c++) {
                if (PQgetisnull(res, r, c)) {
                    w.I32(-1);
                } else {
                    int len = PQgetlength(res, r, c);
                    w.I32(len).Raw(PQgetvalue(res, r, c), static_cast<size_t>(len));
                }
            }
            Queue(std::move(w.buffer()), false);
        }
        // In single-row mode a statement ends with a zero-row PGRES_TUPLES_OK; the next
        // statement of a multi-statement string describes its own columns.
        if (status == PGRES_TUPLES_OK)
            t.columns_sent = false;
        break;
    }
    case PGRES_COMMAND_OK:
    case PGRES_EMPTY_QUERY:
        break;
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
        if (!t.failed) {
            t.failed = true;
            t.sqlstate = SqlState(ERRCODE_FEATURE_NOT_SUPPORTED);
            t.message = "COPY is not supported through pg_peerpool";
        }
        t.copy = true;
        break;
    default:
        if (!t.failed) {
            t.failed = true;
            t.sqlstate = ResultField(res, PG_DIAG_SQLSTATE);
            if (t.sqlstate.empty())
                t.sqlstate = SqlState(ERRCODE_CONNECTION_FAILURE);
            t.message = ResultField(res, PG_DIAG_MESSAGE_PRIMARY);
            if (t.message.empty())
                t.message = OneLine(PQresultErrorMessage(res));
            t.detail = ResultField(res, PG_DIAG_MESSAGE_DETAIL);
            t.hint = ResultField(res, PG_DIAG_MESSAGE_HINT);
        }
        break;
    }
    bool copy = status == PGRES_COPY_IN || status == PGRES_COPY_OUT || status == PGRES_COPY_BOTH;
    PQclear(res);
    if (copy)
        return false; // stop here; Pump() discards the connection
    return outbox_bytes_ < kOutboxLimit;
}

void Request::OnLost(int task, const std::string &error, TimestampTz now)
{
    if (task < 0 || static_cast<size_t>(task) >= tasks_.size())
        return;
    Task &t = tasks_[task];
    if (t.state == TASK_DONE)
        return;
    FinishTask(task, false, SqlState(ERRCODE_CONNECTION_FAILURE),
               Format("node \"%s\": connection lost: %s", t.node.c_str(), error.c_str()), now);
    Flush();
}

void Request::OnWaitFailed(int task, int sqlerrcode, const std::string &error, TimestampTz now)
{
    if (task < 0 || static_cast<size_t>(task) >= tasks_.size())
        return;
    if (tasks_[task].state != TASK_WAITING)
        return;
    FinishTask(task, false, SqlState(sqlerrcode), error, now);
    Flush();
}

void Request::Abandon(TimestampTz now)
{
    if (abandoned_)
        return;
    abandoned_ = true;
    for (size_t i = 0; i < tasks_.size(); i++) {
        Task &t = tasks_[i];
        Node *node = host_.FindNode(t.node);
        if (node != nullptr && t.state == TASK_WAITING)
            node->CancelWait({key_, static_cast<int>(i)});
        else if (node != nullptr && t.state == TASK_RUNNING)
            node->AbortLease(t.conn_id, now); // cancels the remote query without waiting
        t.state = TASK_DONE;
    }
    outbox_.clear();
    outbox_bytes_ = 0;
    finished_ = true;
}

TimestampTz Request::NextWake() const
{
    // After the deadline was handled only the caller's reading moves us on (shm_mq sets our
    // latch): a deadline in the past must not turn the loop into a busy wait.
    if (finished_ || !launched_ || timed_out_)
        return 0;
    return deadline_;
}

void Request::DropQueuedRows(int index)
{
    for (auto it = outbox_.begin(); it != outbox_.end();) {
        const std::string &m = it->first;
        uint32_t task = UINT32_MAX; // rows ('R') and columns ('C') start with their task
        if ((m[0] == 'R' || m[0] == 'C') && m.size() >= 1 + sizeof(task))
            memcpy(&task, m.data() + 1, sizeof(task));
        if (task == static_cast<uint32_t>(index)) {
            outbox_bytes_ -= m.size();
            it = outbox_.erase(it);
        } else {
            ++it;
        }
    }
}

void Request::Refuse(int sqlerrcode, const std::string &message, const std::string &hint)
{
    refused_ = true;
    Fail(sqlerrcode, message, "", hint);
    Flush();
}

void Request::FailInternal(const std::string &message)
{
    if (finished_)
        return;
    // Whatever this request queued is void; the caller gets one error and its remote queries
    // are cancelled. Nothing of it may reach another request.
    TimestampTz now = GetCurrentTimestamp();
    bool was_abandoned = abandoned_;
    Abandon(now);
    if (was_abandoned)
        return;
    abandoned_ = false; // send the error (Abandon dropped the outbox)
    end_queued_ = false;
    finished_ = false;
    Fail(ERRCODE_INTERNAL_ERROR, message, "The pool manager failed this request only.");
    try {
        Flush();
    } catch (...) {
        // As below: the caller learns from its freed slot.
    }
    if (!outbox_.empty()) {
        // The caller is not reading: give up on telling it; it sees its slot freed.
        outbox_.clear();
        outbox_bytes_ = 0;
    }
    abandoned_ = true;
    finished_ = true;
}

void Request::Queue(std::string message, bool flush)
{
    outbox_bytes_ += message.size();
    outbox_.emplace_back(std::move(message), flush);
}

void Request::Flush()
{
    bool urgent = outbox_bytes_ >= kPublishBytes;
    for (const auto &m : outbox_)
        urgent = urgent || m.second;
    if (!urgent)
        return; // nothing the caller needs yet: keep batching
    while (!outbox_.empty() && !abandoned_) {
        auto &[message, force] = outbox_.front();
        // Publish at the end of every batch: the caller must see all we have queued.
        bool flush = force || outbox_.size() == 1;
        shm_mq_handle *out = out_;
        const std::string &m = message;
        shm_mq_result r = pg::Call(
            [&] { return shm_mq_send(out, m.size(), m.data(), true, flush); });
        if (r == SHM_MQ_WOULD_BLOCK)
            return; // the caller reads; shm_mq sets our latch when there is room again
        if (r == SHM_MQ_DETACHED) {
            Abandon(GetCurrentTimestamp());
            return;
        }
        outbox_bytes_ -= message.size();
        outbox_.pop_front();
    }
}

} // namespace peerpool
