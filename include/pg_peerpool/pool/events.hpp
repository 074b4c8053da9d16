// Node state transitions: every one goes to the shared-memory ring (peerpool.events), the
// server log (LOG), and NOTIFY peerpool_events with a JSON payload (SPEC section 3).
#pragma once

#include <string>
#include <vector>

#include "pg_peerpool/shmem.hpp"

namespace peerpool {

class EventLog {
public:
    // Records one transition. Ring and log at once; the NOTIFY waits for Flush().
    void Record(const std::string &node, NodeState from, NodeState to, const std::string &reason,
                TimestampTz at);

    // Sends the queued notifications in one transaction. Failures are logged, not thrown;
    // the notifications are kept (bounded) and retried once a second, so a NOTIFY lock held by
    // somebody else costs the loop one lock_timeout per second, never a wait.
    void Flush(TimestampTz now);

    bool HasPending() const { return !pending_.empty(); }

private:
    std::vector<std::string> pending_; // JSON payloads
    TimestampTz retry_at_ = 0;         // after a failed NOTIFY, not before this
    bool blocked_ = false;             // the last attempt failed (logged once)
};

// How many notifications wait for delivery at most (the oldest are dropped first).
constexpr size_t kMaxPendingNotifications = 1000;

// "2026-11-22T10:11:12.123456Z"
std::string FormatTimestampUtc(TimestampTz at);

// A JSON string literal (quotes included).
std::string JsonString(const std::string &value);

} // namespace peerpool
