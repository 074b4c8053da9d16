// peerpool._node_health(): the rows of the peerpool.node_health view, read from shared memory.
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
}

namespace peerpool {

// PostgreSQL calls only (run through pg::Call). The slots are copied under the shared lock
// into palloc'd memory first, so no tuple building or allocation happens while it is held.
static void NodeHealthRows(FunctionCallInfo fcinfo, SharedState *state)
{
    InitMaterializedSRF(fcinfo, 0);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);

    NodeSlot *copy = static_cast<NodeSlot *>(palloc(sizeof(NodeSlot) * state->max_nodes));
    int count = 0;
    LWLockAcquire(state->lock, LW_SHARED);
    for (int i = 0; i < state->max_nodes; i++)
        if (state->nodes[i].in_use)
            copy[count++] = state->nodes[i];
    LWLockRelease(state->lock);

    for (int i = 0; i < count; i++) {
        const NodeSlot &n = copy[i];
        Datum values[13];
        bool nulls[13] = {false};
        values[0] = CStringGetTextDatum(n.name);
        values[1] = CStringGetTextDatum(NodeStateName(n.state));
        values[2] = CStringGetTextDatum(NodeRoleName(n.detected_role));
        values[3] = TimestampTzGetDatum(n.state_since);
        values[4] = TimestampTzGetDatum(n.last_check);
        nulls[4] = n.last_check == 0;
        values[5] = TimestampTzGetDatum(n.last_success);
        nulls[5] = n.last_success == 0;
        values[6] = Int32GetDatum(n.consecutive_failures);
        values[7] = CStringGetTextDatum(n.last_error);
        nulls[7] = n.last_error[0] == '\0';
        values[8] = CStringGetTextDatum(n.last_sqlstate);
        nulls[8] = n.last_sqlstate[0] == '\0';
        values[9] = Float8GetDatum(n.latency_ms);
        nulls[9] = n.latency_ms < 0;
        values[10] = Float8GetDatum(n.replication_lag_ms);
        nulls[10] = n.replication_lag_ms < 0;
        values[11] = Int32GetDatum(n.retry_attempt);
        values[12] = TimestampTzGetDatum(n.next_retry_at);
        nulls[12] = n.next_retry_at == 0;
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    }
    pfree(copy);
}

static Datum NodeHealth(FunctionCallInfo fcinfo)
{
    SharedState &state = RequireShared();
    pg::Call([&] { NodeHealthRows(fcinfo, &state); });
    return (Datum)0;
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(peerpool_node_health, peerpool::NodeHealth)
