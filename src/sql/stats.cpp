// pool_stats(), pool_reset_stats(), the peerpool.events rows, and pool_check_health().
#include <vector>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/node_config.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
}

namespace peerpool {

namespace {

// PostgreSQL calls only. Gauges and counters are atomics: no lock, the view never waits.
void PoolStatsRows(FunctionCallInfo fcinfo, SharedState *state)
{
    InitMaterializedSRF(fcinfo, 0);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
    for (int i = 0; i < state->max_nodes; i++) {
        NodeSlot &n = state->nodes[i];
        char name[kNodeNameSize];
        NodeState node_state;
        LWLockAcquire(state->lock, LW_SHARED);
        bool in_use = n.in_use;
        memcpy(name, n.name, sizeof(name));
        node_state = n.state;
        LWLockRelease(state->lock);
        if (!in_use)
            continue;
        Datum values[14];
        bool nulls[14] = {false};
        values[0] = CStringGetTextDatum(name);
        values[1] = CStringGetTextDatum(NodeStateName(node_state));
        values[2] = Int32GetDatum(static_cast<int32>(pg_atomic_read_u32(&n.total)));
        values[3] = Int32GetDatum(static_cast<int32>(pg_atomic_read_u32(&n.active)));
        values[4] = Int32GetDatum(static_cast<int32>(pg_atomic_read_u32(&n.idle)));
        values[5] = Int32GetDatum(static_cast<int32>(pg_atomic_read_u32(&n.waiting)));
        values[6] = Int64GetDatum(static_cast<int64>(pg_atomic_read_u64(&n.created)));
        values[7] = Int64GetDatum(static_cast<int64>(pg_atomic_read_u64(&n.closed)));
        values[8] = Int64GetDatum(static_cast<int64>(pg_atomic_read_u64(&n.recycled)));
        values[9] = Int64GetDatum(static_cast<int64>(pg_atomic_read_u64(&n.acquires)));
        values[10] = Int64GetDatum(static_cast<int64>(pg_atomic_read_u64(&n.acquire_timeouts)));
        uint64 queries = pg_atomic_read_u64(&n.queries);
        values[11] = Int64GetDatum(static_cast<int64>(queries));
        values[12] = Int64GetDatum(static_cast<int64>(pg_atomic_read_u64(&n.errors)));
        double total_us = static_cast<double>(pg_atomic_read_u64(&n.query_time_us));
        values[13] = Float8GetDatum(queries > 0 ? total_us / 1000.0 / queries : 0);
        nulls[13] = queries == 0;
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    }
}

void EventRows(FunctionCallInfo fcinfo, SharedState *state)
{
    InitMaterializedSRF(fcinfo, 0);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
    EventRecord *copy = static_cast<EventRecord *>(palloc(sizeof(EventRecord) * kEventRingSize));
    LWLockAcquire(state->lock, LW_SHARED);
    uint64 written = state->events_written;
    int count = static_cast<int>(Min(written, static_cast<uint64>(kEventRingSize)));
    for (int k = 0; k < count; k++) // newest first
        copy[k] = state->events[(written - 1 - k) % kEventRingSize];
    LWLockRelease(state->lock);
    for (int k = 0; k < count; k++) {
        const EventRecord &e = copy[k];
        Datum values[5];
        bool nulls[5] = {false};
        values[0] = TimestampTzGetDatum(e.at);
        values[1] = CStringGetTextDatum(e.node_name);
        values[2] = CStringGetTextDatum(NodeStateName(e.from_state));
        values[3] = CStringGetTextDatum(NodeStateName(e.to_state));
        values[4] = CStringGetTextDatum(e.reason);
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    }
    pfree(copy);
}

void ResetCounters(SharedState *state)
{
    for (int i = 0; i < state->max_nodes; i++) {
        NodeSlot &n = state->nodes[i];
        for (pg_atomic_uint64 *c : {&n.created, &n.closed, &n.recycled, &n.acquires,
                                    &n.acquire_timeouts, &n.queries, &n.errors, &n.query_time_us})
            pg_atomic_write_u64(c, 0);
    }
}

// Sleeps on check_cv until done(arg) holds, the pool manager is gone, or timeout_ms passed.
// PostgreSQL calls only; interrupts are honoured while waiting. Returns done(arg).
bool WaitOnCheckCv(SharedState *state, bool (*done)(SharedState *, void *), void *arg,
                   long timeout_ms)
{
    TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
    bool ok = false;
    ConditionVariablePrepareToSleep(&state->check_cv);
    for (;;) {
        ok = done(state, arg);
        if (ok || pg_atomic_read_u32(&state->worker_procno_plus1) == 0)
            break;
        long left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
        if (left <= 0)
            break;
        ConditionVariableTimedSleep(&state->check_cv, Min(left, 100L), PG_WAIT_EXTENSION);
    }
    ConditionVariableCancelSleep();
    return ok;
}

// Waits until the pool manager has applied every registry change committed before this call
// (so a node added by the caller's previous statement is known).
bool WaitForRegistry(SharedState *state, long timeout_ms)
{
    uint64 target = pg_atomic_read_u64(&state->registry_generation);
    return WaitOnCheckCv(
        state,
        [](SharedState *s, void *arg) {
            LWLockAcquire(s->lock, LW_SHARED);
            bool loaded = s->loaded_generation >= *static_cast<uint64 *>(arg);
            LWLockRelease(s->lock);
            return loaded;
        },
        &target, timeout_ms);
}

struct CheckWait {
    int slot;
    char name[kNodeNameSize];
    uint64 target;
};

// Asks for a check of the given slots and waits until each is served, the deadline passes, or
// the pool manager goes away. PostgreSQL calls only; interrupts are honoured while waiting.
// Returns the number of nodes not served in time.
struct CheckBatch {
    CheckWait *waits;
    int count;
    int pending;
};

int RequestChecksAndWait(SharedState *state, CheckWait *waits, int count, long timeout_ms)
{
    for (int i = 0; i < count; i++)
        waits[i].target = pg_atomic_add_fetch_u64(&state->nodes[waits[i].slot].check_requested, 1);
    pg_atomic_fetch_add_u64(&state->check_requests, 1); // after: the manager then sees them
    WakePoolManager();
    CheckBatch batch{waits, count, count};
    WaitOnCheckCv(
        state,
        [](SharedState *s, void *arg) {
            auto *b = static_cast<CheckBatch *>(arg);
            b->pending = 0;
            for (int i = 0; i < b->count; i++) {
                NodeSlot &n = s->nodes[b->waits[i].slot];
                LWLockAcquire(s->lock, LW_SHARED);
                bool same_node = n.in_use && strcmp(n.name, b->waits[i].name) == 0;
                LWLockRelease(s->lock);
                if (same_node && pg_atomic_read_u64(&n.check_completed) < b->waits[i].target)
                    b->pending++;
            }
            return b->pending == 0;
        },
        &batch, timeout_ms);
    return batch.pending;
}

} // namespace

static Datum PoolStats(FunctionCallInfo fcinfo)
{
    SharedState &state = RequireShared();
    pg::Call([&] { PoolStatsRows(fcinfo, &state); });
    return (Datum)0;
}

static Datum Events(FunctionCallInfo fcinfo)
{
    SharedState &state = RequireShared();
    pg::Call([&] { EventRows(fcinfo, &state); });
    return (Datum)0;
}

static Datum PoolResetStats(FunctionCallInfo)
{
    SharedState &state = RequireShared();
    ResetCounters(&state);
    PG_RETURN_VOID();
}

// Runs a check now on one node (or all), waits for it, and leaves the node_health rows to the
// SQL wrapper (which selects them after this returns).
static Datum RequestCheck(FunctionCallInfo fcinfo)
{
    SharedState &state = RequireShared();
    std::string only;
    if (!PG_ARGISNULL(0)) {
        only = pg::Call([&] { return text_to_cstring(PG_GETARG_TEXT_PP(0)); });
        ValidateNodeName(only);
    }
    if (pg_atomic_read_u32(&state.worker_procno_plus1) == 0)
        throw Error(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "the pg_peerpool pool manager is not running",
                    "It restarts automatically within seconds after a crash or termination.",
                    "Check the server log for the reason it stopped.");

    pg::Call([&] { WaitForRegistry(&state, 1000); });

    std::vector<CheckWait> waits;
    waits.reserve(static_cast<size_t>(state.max_nodes)); // no allocation under the lock
    LWLockAcquire(state.lock, LW_SHARED);                // cannot error with one lock held
    for (int i = 0; i < state.max_nodes; i++) {
        const NodeSlot &n = state.nodes[i];
        if (n.in_use && (only.empty() || only == n.name)) {
            CheckWait w{};
            w.slot = i;
            strlcpy(w.name, n.name, sizeof(w.name));
            waits.push_back(w);
        }
    }
    LWLockRelease(state.lock);
    if (!only.empty() && waits.empty())
        throw Error(ERRCODE_UNDEFINED_OBJECT, Format("node \"%s\" does not exist", only.c_str()),
                    "", "The registered nodes are listed in peerpool.nodes.");

    long timeout = static_cast<long>(peerpool_connect_timeout) + peerpool_health_check_timeout +
                   1000;
    CheckWait *data = waits.data();
    int count = static_cast<int>(waits.size());
    int late = pg::Call([&] { return RequestChecksAndWait(&state, data, count, timeout); });
    if (late > 0 && pg_atomic_read_u32(&state.worker_procno_plus1) == 0)
        throw Error(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "the pg_peerpool pool manager stopped while checks were pending");
    PG_RETURN_VOID();
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(peerpool_pool_stats, peerpool::PoolStats)
PEERPOOL_SQL_FUNCTION(peerpool_events, peerpool::Events)
PEERPOOL_SQL_FUNCTION(peerpool_pool_reset_stats, peerpool::PoolResetStats)
PEERPOOL_SQL_FUNCTION(peerpool_request_check, peerpool::RequestCheck)
