// SQL-callable pieces of the install script: the install-time checks, the registry trigger,
// and conninfo masking for the peerpool.nodes view.
#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/conninfo.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "commands/dbcommands.h"
#include "commands/trigger.h"
#include "miscadmin.h"
#include "utils/builtins.h"
}

namespace peerpool {

// Refuses CREATE EXTENSION outside peerpool.database; at commit, wakes the pool manager so it
// starts mirroring the (new) registry at once.
static Datum AssertInstallable(FunctionCallInfo)
{
    RequireShared();
    std::string current = pg::Call([] { return get_database_name(MyDatabaseId); });
    if (current != peerpool_database)
        throw Error(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    Format("pg_peerpool can only be installed in database \"%s\"",
                           peerpool_database),
                    Format("The current database is \"%s\".", current.c_str()),
                    Format("Connect to database \"%s\", or set peerpool.database = '%s' in "
                           "postgresql.conf and restart the server.",
                           peerpool_database, current.c_str()));
    MarkRegistryChangedAtCommit();
    PG_RETURN_VOID();
}

// Statement-level AFTER trigger on peerpool.node.
static Datum NodeChanged(FunctionCallInfo fcinfo)
{
    if (!CALLED_AS_TRIGGER(fcinfo))
        throw Error(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                    "peerpool._node_changed() must be called as a trigger");
    MarkRegistryChangedAtCommit();
    return PointerGetDatum(nullptr);
}

static Datum MaskConninfoSql(FunctionCallInfo fcinfo)
{
    // text_to_cstring can only fail on out-of-memory; guarded anyway.
    std::string conninfo = pg::Call([&] { return text_to_cstring(PG_GETARG_TEXT_PP(0)); });
    std::string masked = MaskConninfo(conninfo);
    return pg::Call([&] { return PointerGetDatum(cstring_to_text(masked.c_str())); });
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(peerpool_assert_installable, peerpool::AssertInstallable)
PEERPOOL_SQL_FUNCTION(peerpool_node_changed, peerpool::NodeChanged)
PEERPOOL_SQL_FUNCTION(peerpool_mask_conninfo, peerpool::MaskConninfoSql)
