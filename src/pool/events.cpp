// The event log of node state transitions: shared-memory ring, LOG line, NOTIFY.
#include "pg_peerpool/pool/events.hpp"

#include <ctime>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "access/xact.h"
#include "commands/async.h"
#include "utils/timestamp.h"
}

namespace peerpool {

std::string FormatTimestampUtc(TimestampTz at)
{
    int64 unix_usec = at +
                      (static_cast<int64>(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY);
    time_t secs = static_cast<time_t>(unix_usec / USECS_PER_SEC);
    long usec = static_cast<long>(unix_usec % USECS_PER_SEC);
    if (usec < 0) {
        usec += USECS_PER_SEC;
        secs -= 1;
    }
    struct tm tm_utc;
    gmtime_r(&secs, &tm_utc);
    char buf[64];
    size_t n = strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm_utc);
    snprintf(buf + n, sizeof(buf) - n, ".%06ldZ", usec);
    return buf;
}

std::string JsonString(const std::string &value)
{
    std::string out = "\"";
    for (unsigned char c : value) {
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
        case '\r':
            out += "\\r";
            break;
        case '\t':
            out += "\\t";
            break;
        default:
            if (c < 0x20) {
                char esc[8];
                snprintf(esc, sizeof(esc), "\\u%04x", c);
                out += esc;
            } else {
                out.push_back(static_cast<char>(c));
            }
        }
    }
    out.push_back('"');
    return out;
}

void EventLog::Record(const std::string &node, NodeState from, NodeState to,
                      const std::string &reason, TimestampTz at)
{
    SharedState &state = RequireShared();
    char e_reason[kReasonSize];
    CopyClipped(e_reason, sizeof(e_reason), reason);
    // LWLockAcquire errors only when too many LWLocks are held; this is the only one held.
    LWLockAcquire(state.lock, LW_EXCLUSIVE);
    EventRecord &e = state.events[state.events_written % kEventRingSize];
    e.at = at;
    strlcpy(e.node_name, node.c_str(), sizeof(e.node_name));
    e.from_state = from;
    e.to_state = to;
    CopyClipped(e.reason, sizeof(e.reason), reason);
    state.events_written++;
    LWLockRelease(state.lock);

    pg::Call([&] {
        ereport(LOG, (errmsg_internal("pg_peerpool: node \"%s\": %s -> %s: %s", node.c_str(),
                                      NodeStateName(from), NodeStateName(to), reason.c_str())));
    });

    std::string payload = "{\"node_name\": " + JsonString(node) +
                          ", \"from\": " + JsonString(NodeStateName(from)) +
                          ", \"to\": " + JsonString(NodeStateName(to)) +
                          // peerpool.notify_reason = off: LISTENers learn no host or error
                          (peerpool_notify_reason
                               ? ", \"reason\": " + JsonString(std::string(e_reason))
                               : std::string()) +
                          ", \"at\": " + JsonString(FormatTimestampUtc(at)) + "}";
    // Bounded: a worker that cannot notify (e.g. a hot standby coordinator) keeps the newest.
    if (pending_.size() >= kMaxPendingNotifications)
        pending_.erase(pending_.begin());
    pending_.push_back(std::move(payload));
}

namespace {

struct NotifyBatch {
    const std::vector<std::string> *payloads;
};

// PostgreSQL calls only.
void SendNotifications(const NotifyBatch &batch)
{
    SetCurrentStatementStartTimestamp();
    StartTransactionCommand();
    for (const std::string &p : *batch.payloads)
        Async_Notify("peerpool_events", p.c_str());
    CommitTransactionCommand();
}

} // namespace

void EventLog::Flush(TimestampTz now)
{
    if (pending_.empty() || now < retry_at_)
        return;
    std::vector<std::string> batch;
    batch.swap(pending_);
    NotifyBatch b{&batch};
    try {
        pg::Call([&] { SendNotifications(b); });
        if (blocked_)
            pg::Call([&] {
                ereport(LOG, (errmsg_internal("pg_peerpool: NOTIFY peerpool_events delivered "
                                              "again (%zu delayed notifications sent)",
                                              batch.size())));
            });
        blocked_ = false;
    } catch (const Error &e) {
        // Keep them (oldest first, bounded) and try again in a second.
        batch.insert(batch.end(), pending_.begin(), pending_.end());
        if (batch.size() > kMaxPendingNotifications)
            batch.erase(batch.begin(), batch.end() - kMaxPendingNotifications);
        pending_.swap(batch);
        retry_at_ = TimestampTzPlusMilliseconds(now, 1000);
        bool first = !blocked_;
        blocked_ = true;
        pg::Call([&] {
            AbortOutOfAnyTransaction();
            if (first)
                ereport(LOG, (errmsg_internal("pg_peerpool: could not send NOTIFY "
                                              "peerpool_events, retrying every second: %s",
                                              e.message().c_str())));
        });
    }
}

} // namespace peerpool
