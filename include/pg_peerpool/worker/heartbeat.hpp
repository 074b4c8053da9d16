// The pool manager's heartbeat: how the views tell a working pool manager from one that is
// stopped, restarting or hung (peerpool.pool_manager, peerpool.node_health.stale).
#pragma once

#include "pg_peerpool/shmem.hpp"

namespace peerpool {

// The pool manager wakes at least this often, so a running one never has an older heartbeat.
constexpr long kHeartbeatIntervalMs = 1000;
// A heartbeat older than this means nobody is checking the nodes: the pool manager is hung
// (stopped by a signal, blocked in a call), or busy shutting down.
constexpr long kHeartbeatStaleMs = 5000;

// Called by the pool manager at every wake of its loop, with the sleep it is about to take:
// records that it is alive (its start, the first time, and its exit at process exit), and
// returns that sleep bounded by kHeartbeatIntervalMs. Never errors.
long PublishHeartbeat(long sleep_ms);

enum class PoolManagerState {
    kRunning,       // a pool manager publishes, with a heartbeat younger than kHeartbeatStaleMs
    kNotResponding, // its process exists but its heartbeat is older
    kStopped,       // no pool manager (terminated, crashed, restarting, not started yet)
};

struct PoolManagerInfo {
    PoolManagerState state;
    int pid;                 // 0 unless a pool manager process exists
    TimestampTz started_at;  // 0 = never started
    TimestampTz stopped_at;  // 0 = never stopped
    TimestampTz heartbeat;   // 0 = never
    double heartbeat_age_ms; // < 0 = no heartbeat
    int restarts;            // starts - 1, since shared memory was made
};

// A consistent reading of SharedState::manager, for the views. Never errors.
PoolManagerInfo ReadPoolManager(SharedState &state);

const char *PoolManagerStateName(PoolManagerState state);

} // namespace peerpool
