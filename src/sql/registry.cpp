// pool_add_node, pool_alter_node, pool_remove_node (SPEC section 2).
//
// Arguments are validated in C++ first (22023); then short C-style SPI routines, run through
// pg::Call, touch peerpool.node. The table's trigger asks the pool manager to reload at commit,
// so a rolled-back call leaves nothing behind anywhere.
#include <optional>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/node_config.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
}

namespace peerpool {

namespace {

// NULL when the argument is SQL NULL.
std::optional<std::string> TextArg(FunctionCallInfo fcinfo, int n)
{
    if (PG_ARGISNULL(n))
        return std::nullopt;
    char *value = pg::Call([&] { return text_to_cstring(PG_GETARG_TEXT_PP(n)); });
    return std::string(value);
}

std::optional<int> IntArg(FunctionCallInfo fcinfo, int n)
{
    if (PG_ARGISNULL(n))
        return std::nullopt;
    return PG_GETARG_INT32(n);
}

std::optional<bool> BoolArg(FunctionCallInfo fcinfo, int n)
{
    if (PG_ARGISNULL(n))
        return std::nullopt;
    return PG_GETARG_BOOL(n);
}

template <typename T> T Required(const std::optional<T> &value, const char *name)
{
    if (!value)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, Format("%s must not be NULL", name));
    return *value;
}

const char *RoleText(NodeRole role) { return NodeRoleName(role); }

// The row as read for pool_alter_node, in the caller's memory context.
struct NodeRow {
    bool found;
    char *conninfo;
    int32 min_connections;
    int32 max_connections;
    char *role;
    int32 weight;
    bool enabled;
};

// --- SPI routines: PostgreSQL calls only, run through pg::Call -------------------------------

void SpiConnect()
{
    if (SPI_connect() != SPI_OK_CONNECT)
        elog(ERROR, "SPI_connect failed");
}

void SpiExec(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls, int expect)
{
    int rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);
    if (rc != expect)
        elog(ERROR, "SPI_execute_with_args failed: %s", SPI_result_code_string(rc));
}

// Serializes registry changes so the duplicate and max_nodes checks cannot race.
void LockRegistry()
{
    if (SPI_execute("LOCK TABLE peerpool.node IN SHARE ROW EXCLUSIVE MODE", false, 0) !=
        SPI_OK_UTILITY)
        elog(ERROR, "could not lock peerpool.node");
}

bool NodeExists(const char *name)
{
    Oid types[1] = {TEXTOID};
    Datum values[1] = {CStringGetTextDatum(name)};
    SpiExec("SELECT 1 FROM peerpool.node WHERE node_name = $1", 1, types, values, nullptr,
            SPI_OK_SELECT);
    return SPI_processed > 0;
}

void AddNodeSpi(const char *name, const char *conninfo, int32 min_conn, int32 max_conn,
                const char *role, int32 weight, bool enabled)
{
    SpiConnect();
    LockRegistry();
    if (NodeExists(name))
        ereport(ERROR, (errcode(ERRCODE_DUPLICATE_OBJECT),
                        errmsg("node \"%s\" already exists", name),
                        errhint("Use pool_alter_node() to change it.")));

    // read_only = false: see rows added earlier in this same statement (e.g. several
    // pool_add_node calls in one SELECT), or they would slip past the limit.
    if (SPI_execute("SELECT count(*) FROM peerpool.node", false, 0) != SPI_OK_SELECT)
        elog(ERROR, "could not count nodes");
    bool isnull = false;
    int64 count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
                                              &isnull));
    if (count >= peerpool_max_nodes)
        ereport(ERROR, (errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
                        errmsg("cannot add node \"%s\": peerpool.max_nodes (%d) reached", name,
                               peerpool_max_nodes),
                        errhint("Remove a node, or raise peerpool.max_nodes and restart the "
                                "server.")));

    Oid types[7] = {TEXTOID, TEXTOID, INT4OID, INT4OID, TEXTOID, INT4OID, BOOLOID};
    Datum values[7] = {CStringGetTextDatum(name), CStringGetTextDatum(conninfo),
                       Int32GetDatum(min_conn),  Int32GetDatum(max_conn),
                       CStringGetTextDatum(role), Int32GetDatum(weight),
                       BoolGetDatum(enabled)};
    SpiExec("INSERT INTO peerpool.node (node_name, conninfo, min_connections, max_connections, "
            "role, weight, enabled) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            7, types, values, nullptr, SPI_OK_INSERT);
    SPI_finish();
}

NodeRow ReadNodeForUpdateSpi(const char *name)
{
    NodeRow row{};
    MemoryContext caller = CurrentMemoryContext;
    SpiConnect();
    LockRegistry();
    Oid types[1] = {TEXTOID};
    Datum values[1] = {CStringGetTextDatum(name)};
    SpiExec("SELECT conninfo, min_connections, max_connections, role, weight, enabled "
            "FROM peerpool.node WHERE node_name = $1 FOR UPDATE",
            1, types, values, nullptr, SPI_OK_SELECT);
    if (SPI_processed > 0) {
        HeapTuple tuple = SPI_tuptable->vals[0];
        TupleDesc desc = SPI_tuptable->tupdesc;
        bool isnull = false;
        MemoryContext spi = MemoryContextSwitchTo(caller);
        row.found = true;
        row.conninfo = TextDatumGetCString(SPI_getbinval(tuple, desc, 1, &isnull));
        row.min_connections = DatumGetInt32(SPI_getbinval(tuple, desc, 2, &isnull));
        row.max_connections = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
        row.role = TextDatumGetCString(SPI_getbinval(tuple, desc, 4, &isnull));
        row.weight = DatumGetInt32(SPI_getbinval(tuple, desc, 5, &isnull));
        row.enabled = DatumGetBool(SPI_getbinval(tuple, desc, 6, &isnull));
        MemoryContextSwitchTo(spi);
    }
    SPI_finish();
    return row;
}

void UpdateNodeSpi(const char *name, const char *conninfo, int32 min_conn, int32 max_conn,
                   const char *role, int32 weight, bool enabled)
{
    SpiConnect();
    Oid types[7] = {TEXTOID, TEXTOID, INT4OID, INT4OID, TEXTOID, INT4OID, BOOLOID};
    Datum values[7] = {CStringGetTextDatum(name), CStringGetTextDatum(conninfo),
                       Int32GetDatum(min_conn),  Int32GetDatum(max_conn),
                       CStringGetTextDatum(role), Int32GetDatum(weight),
                       BoolGetDatum(enabled)};
    SpiExec("UPDATE peerpool.node SET conninfo = $2, min_connections = $3, "
            "max_connections = $4, role = $5, weight = $6, enabled = $7, updated_at = now() "
            "WHERE node_name = $1",
            7, types, values, nullptr, SPI_OK_UPDATE);
    SPI_finish();
}

bool RemoveNodeSpi(const char *name)
{
    SpiConnect();
    LockRegistry();
    Oid types[1] = {TEXTOID};
    Datum values[1] = {CStringGetTextDatum(name)};
    SpiExec("DELETE FROM peerpool.node WHERE node_name = $1", 1, types, values, nullptr,
            SPI_OK_DELETE);
    bool removed = SPI_processed > 0;
    SPI_finish();
    return removed;
}

[[noreturn]] void ThrowUnknownNode(const std::string &name)
{
    throw Error(ERRCODE_UNDEFINED_OBJECT, Format("node \"%s\" does not exist", name.c_str()),
                "", "The registered nodes are listed in peerpool.nodes.");
}

} // namespace

// --- SQL-callable bodies -------------------------------------------------------------------

static Datum PoolAddNode(FunctionCallInfo fcinfo)
{
    RequireShared();
    NodeConfig config;
    config.name = Required(TextArg(fcinfo, 0), "node_name");
    config.conninfo = Required(TextArg(fcinfo, 1), "conninfo");
    config.min_connections = Required(IntArg(fcinfo, 2), "min_connections");
    config.max_connections = Required(IntArg(fcinfo, 3), "max_connections");
    config.role = ParseRole(Required(TextArg(fcinfo, 4), "role"));
    config.weight = Required(IntArg(fcinfo, 5), "weight");
    config.enabled = Required(BoolArg(fcinfo, 6), "enabled");
    ValidateNodeConfig(config);

    pg::Call([&] {
        AddNodeSpi(config.name.c_str(), config.conninfo.c_str(), config.min_connections,
                   config.max_connections, RoleText(config.role), config.weight, config.enabled);
    });
    PG_RETURN_VOID();
}

static Datum PoolAlterNode(FunctionCallInfo fcinfo)
{
    RequireShared();
    std::string name = Required(TextArg(fcinfo, 0), "node_name");
    ValidateNodeName(name);
    // Validate what was passed before touching the table, so errors name the bad argument.
    std::optional<std::string> conninfo = TextArg(fcinfo, 1);
    std::optional<std::string> role = TextArg(fcinfo, 4);
    if (role)
        ParseRole(*role);

    NodeRow row = pg::Call([&] { return ReadNodeForUpdateSpi(name.c_str()); });
    if (!row.found)
        ThrowUnknownNode(name);

    NodeConfig config;
    config.name = name;
    config.conninfo = conninfo.value_or(row.conninfo);
    config.min_connections = IntArg(fcinfo, 2).value_or(row.min_connections);
    config.max_connections = IntArg(fcinfo, 3).value_or(row.max_connections);
    config.role = ParseRole(role.value_or(row.role));
    config.weight = IntArg(fcinfo, 5).value_or(row.weight);
    config.enabled = BoolArg(fcinfo, 6).value_or(row.enabled);
    ValidateNodeConfig(config);

    pg::Call([&] {
        UpdateNodeSpi(config.name.c_str(), config.conninfo.c_str(), config.min_connections,
                      config.max_connections, RoleText(config.role), config.weight,
                      config.enabled);
    });
    PG_RETURN_VOID();
}

static Datum PoolRemoveNode(FunctionCallInfo fcinfo)
{
    RequireShared();
    std::string name = Required(TextArg(fcinfo, 0), "node_name");
    ValidateNodeName(name);
    bool removed = pg::Call([&] { return RemoveNodeSpi(name.c_str()); });
    if (!removed)
        ThrowUnknownNode(name);
    PG_RETURN_VOID();
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(pool_add_node, peerpool::PoolAddNode)
PEERPOOL_SQL_FUNCTION(pool_alter_node, peerpool::PoolAlterNode)
PEERPOOL_SQL_FUNCTION(pool_remove_node, peerpool::PoolRemoveNode)
