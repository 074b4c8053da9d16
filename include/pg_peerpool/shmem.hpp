// Shared memory: the node registry mirror and each node's live health.
//
// Layout (one segment "pg_peerpool", sized by peerpool.max_nodes):
//   SharedState header | NodeSlot[max_nodes]
// The pool manager is the only writer of node slots. `lock` (tranche "pg_peerpool") protects
// every non-atomic field of SharedState and NodeSlot: writers hold it exclusive for a few
// field stores, readers (views) shared. Atomics are read without the lock.
// Nothing process-local lives here: no pointers but the LWLock (itself in shared memory).
#pragma once

#include <string>

extern "C" {
#include "postgres.h"
#include "datatype/timestamp.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/lwlock.h"
#include "storage/s_lock.h"
#include "storage/shm_mq.h"
}

namespace peerpool {

constexpr int kNodeNameSize = 64; // 63 characters + NUL (SPEC section 2)
constexpr int kErrorSize = 256;
constexpr int kEventRingSize = 1024; // recent transitions kept for peerpool.events
constexpr int kReasonSize = 256;

enum NodeState : uint8 {
    NODE_STATE_DISCONNECTED,
    NODE_STATE_CONNECTING,
    NODE_STATE_HEALTHY,
    NODE_STATE_DEGRADED,
    NODE_STATE_UNHEALTHY,
    NODE_STATE_RECONNECTING,
    NODE_STATE_TRANSITIONING,
    NODE_STATE_DRAINING,
};

// Role as configured in the catalog (auto = detect) and as detected on the node.
enum NodeRole : uint8 {
    NODE_ROLE_AUTO,
    NODE_ROLE_PRIMARY,
    NODE_ROLE_STANDBY,
    NODE_ROLE_UNKNOWN,
};

const char *NodeStateName(NodeState state);

const char *NodeRoleName(NodeRole role);

struct NodeSlot {
    bool in_use;
    char name[kNodeNameSize];

    // Configuration mirrored from peerpool.node (never the conninfo: it may hold a password).
    int32 min_connections;
    int32 max_connections;
    int32 weight;
    NodeRole configured_role;
    bool enabled;

    // Health (SPEC section 4, peerpool.node_health).
    NodeState state;
    NodeRole detected_role;
    TimestampTz state_since;
    TimestampTz last_check;   // 0 = never
    TimestampTz last_success; // 0 = never
    int32 consecutive_failures;
    char last_error[kErrorSize];
    char last_sqlstate[6];
    double latency_ms;         // < 0 = unknown
    double replication_lag_ms; // < 0 = unknown / not a standby
    int32 retry_attempt;
    TimestampTz next_retry_at; // 0 = none

    // Pool statistics (SPEC section 4, pool_stats). Written by the pool manager, read by
    // anyone without the lock. Gauges:
    pg_atomic_uint32 total;
    pg_atomic_uint32 active;
    pg_atomic_uint32 idle;
    pg_atomic_uint32 waiting;
    // Counters (pool_reset_stats() zeroes them):
    pg_atomic_uint64 created;
    pg_atomic_uint64 closed;
    pg_atomic_uint64 recycled;
    pg_atomic_uint64 acquires;
    pg_atomic_uint64 acquire_timeouts;
    pg_atomic_uint64 queries;
    pg_atomic_uint64 errors;
    pg_atomic_uint64 query_time_us;

    // pool_check_health(): backends bump check_requested and wait on SharedState::check_cv
    // until check_completed reaches their number.
    pg_atomic_uint64 check_requested;
    pg_atomic_uint64 check_completed;
};

// The pool manager's liveness (peerpool.pool_manager, node_health.stale). Written only by the
// pool manager (src/worker/heartbeat.cpp), read by anyone; `mutex` protects every field and
// is never held across anything that can fail.
struct PoolManagerStatus {
    slock_t mutex;
    pid_t pid;              // the pool manager that publishes; 0 = none (stopped, not started)
    TimestampTz started_at; // when the current (or last) pool manager's process started
    TimestampTz stopped_at; // when the last one exited; 0 = none since shared memory was made
    TimestampTz heartbeat;  // its last loop wake (at least every kHeartbeatIntervalMs)
    uint32 starts;          // pool managers started since shared memory was made
};

// One state transition (peerpool.events).
struct EventRecord {
    TimestampTz at;
    char node_name[kNodeNameSize];
    NodeState from_state;
    NodeState to_state;
    char reason[kReasonSize];
};

struct SharedState {
    LWLock *lock;

    // Bumped by every committing transaction that changed peerpool.node (or created the
    // extension); the pool manager reloads when it differs from what it loaded.
    pg_atomic_uint64 registry_generation;
    uint64 loaded_generation;       // under lock
    TimestampTz registry_loaded_at; // under lock
    bool extension_present;         // under lock: the manager saw the extension in its database

    // The pool manager's PGPROC number plus one (0 when not running) and pid, to set its latch.
    pg_atomic_uint32 worker_procno_plus1;
    pid_t worker_pid; // under lock

    // Broadcast by the pool manager whenever a check completes (pool_check_health waits).
    ConditionVariable check_cv;

    // Ring of recent transitions, under lock. events_written counts every event ever written;
    // the newest is at (events_written - 1) % kEventRingSize.
    uint64 events_written;
    EventRecord events[kEventRingSize];

    // Bumped each time a pool manager starts: requests submitted to an earlier one are void.
    pg_atomic_uint32 worker_generation;
    // Bumped by backends whenever a request slot needs the pool manager's attention
    // (submitted, cancelled); the pool manager scans the slots when it changed.
    pg_atomic_uint64 request_events;
    // Bumped by pool_check_health() after it asked for checks: the pool manager then looks
    // for the nodes asked about (it does not read every node's counters on every wake-up).
    pg_atomic_uint64 check_requests;

    PoolManagerStatus manager; // liveness, see PoolManagerStatus

    int max_nodes; // fixed at startup
    NodeSlot nodes[FLEXIBLE_ARRAY_MEMBER];
};

// The request channel (parallel_query, pool_query). Every backend owns the slot indexed by its
// PGPROC number, so taking one needs no lock and no DSM segment is created per call. A slot is
// followed in memory by its request queue (backend -> pool manager) and its response queue.
constexpr Size kRequestQueueSize = 16 * 1024;
constexpr Size kResponseQueueSize = 64 * 1024;

enum RequestSlotState : uint32 {
    REQUEST_SLOT_FREE,      // the backend may start a request
    REQUEST_SLOT_SUBMITTED, // queues created by the backend; the pool manager has not attached
    REQUEST_SLOT_ACTIVE,    // the pool manager is working on it
};

struct RequestSlot {
    slock_t mutex; // protects every field below
    RequestSlotState state;
    bool cancel;              // the backend gave up (error, cancel, exit)
    uint32 worker_generation; // SharedState::worker_generation at submission
    uint64 request_id;
    int backend_pid;
};

int NumRequestSlots();
RequestSlot *GetRequestSlot(int index);
shm_mq *SlotRequestQueue(RequestSlot *slot);
shm_mq *SlotResponseQueue(RequestSlot *slot);

// Resets a slot to an empty, initialized state (atomics included). Caller holds the lock.
void InitNodeSlot(NodeSlot &slot);

// Finds the slot of a node by name; -1 if none. Caller holds the lock (any mode).
int FindNodeSlot(const SharedState &state, const char *name);

// Copies `src` into a fixed-size shared-memory field, cutting at a UTF-8 character boundary.
void CopyClipped(char *dst, size_t size, const std::string &src);

// The attached shared state, or nullptr when the library was not preloaded.
SharedState *Shared();

void InstallShmemHooks();

// Raises an Error (55000) if shared memory is not available.
SharedState &RequireShared();

// Sets the pool manager's latch if it is running. Safe from any backend; never errors.
void WakePoolManager();

} // namespace peerpool

namespace peerpool {

// Asks the pool manager to reload the registry when the current transaction commits
// (and forgets the request if it aborts). Cannot fail.
void MarkRegistryChangedAtCommit();

// Registers the transaction callback behind MarkRegistryChangedAtCommit (from _PG_init).
void RegisterRegistryXactCallback();

} // namespace peerpool
