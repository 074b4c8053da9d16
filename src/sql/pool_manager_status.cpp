// peerpool._pool_manager(): the row of the peerpool.pool_manager view (is anybody checking?).
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/shmem.hpp"
#include "pg_peerpool/worker/heartbeat.hpp"

extern "C" {
#include "access/htup_details.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
}

namespace peerpool {

static Datum PoolManagerRow(FunctionCallInfo fcinfo)
{
    SharedState &state = RequireShared();
    PoolManagerInfo info = ReadPoolManager(state);
    return pg::Call([&] {
        TupleDesc desc;
        if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
            elog(ERROR, "return type must be a row type");
        Datum values[7];
        bool nulls[7] = {false};
        values[0] = Int32GetDatum(info.pid);
        nulls[0] = info.pid == 0;
        values[1] = CStringGetTextDatum(PoolManagerStateName(info.state));
        values[2] = TimestampTzGetDatum(info.started_at);
        nulls[2] = info.started_at == 0;
        values[3] = TimestampTzGetDatum(info.heartbeat);
        nulls[3] = info.heartbeat == 0;
        values[4] = Float8GetDatum(info.heartbeat_age_ms);
        nulls[4] = info.heartbeat_age_ms < 0;
        values[5] = Int32GetDatum(info.restarts);
        values[6] = TimestampTzGetDatum(info.stopped_at);
        nulls[6] = info.stopped_at == 0;
        return HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls));
    });
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(peerpool_pool_manager, peerpool::PoolManagerRow)
