// pool_add_node, pool_alter_node, pool_remove_node (SPEC section 2), and the trigger that
// records which role set each node's conninfo.
//
// Arguments are validated in C++ first (22023); then short C-style SPI routines, run through
// pg::Call, touch peerpool.node. The table's trigger asks the pool manager to reload at commit,
// so a rolled-back call leaves nothing behind anywhere.
//
// Ownership (SPEC section 2, the password rule of postgres_fdw and dblink): pool_add_node and
// pool_alter_node are SECURITY INVOKER so that GetUserId() is the role whose privileges made
// the call -- after SET ROLE, and inside any SECURITY DEFINER function that calls them. That
// role is recorded in peerpool.node.conninfo_owner; a non-superuser's conninfo must carry a
// password. The table itself is owner-only, so the SPI work runs as the table's owner
// (SetUserIdAndSecContext with SECURITY_RESTRICTED_OPERATION, as REFRESH MATERIALIZED VIEW
// does).
#include <optional>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/node_config.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
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

// The role the row trigger records as conninfo_owner while one of our functions writes the
// row (the table owner runs the SPI, so GetUserId() in the trigger is not the caller).
// InvalidOid otherwise; reset in PG_FINALLY, so an error cannot leave it set.
Oid pending_conninfo_owner = InvalidOid;

// Who may do what to peerpool.node, read once per call. PostgreSQL calls only.
struct RegistryAccess {
    Oid owner;             // the table's owner: runs the SPI work
    bool has_owner_column; // false: the 0.1.0 schema (ALTER EXTENSION ... UPDATE pending)
};

RegistryAccess LookupRegistry()
{
    RegistryAccess out{InvalidOid, false};
    Oid relid = get_relname_relid("node", get_namespace_oid("peerpool", false));
    HeapTuple tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
    if (!HeapTupleIsValid(tuple))
        elog(ERROR, "peerpool.node not found");
    out.owner = ((Form_pg_class)GETSTRUCT(tuple))->relowner;
    ReleaseSysCache(tuple);
    out.has_owner_column = get_attnum(relid, "conninfo_owner") != InvalidAttrNumber;
    return out;
}

// Runs fn(arg) -- SPI routines below -- as the table's owner; `record_owner` is what the row
// trigger stores as conninfo_owner if the row is written (InvalidOid: the trigger decides).
void RunAsRegistryOwner(Oid table_owner, Oid record_owner, void (*fn)(void *), void *arg)
{
    Oid save_user;
    int save_sec;
    GetUserIdAndSecContext(&save_user, &save_sec);
    SetUserIdAndSecContext(table_owner,
                           save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
    pending_conninfo_owner = record_owner;
    PG_TRY();
    {
        fn(arg);
    }
    PG_FINALLY();
    {
        pending_conninfo_owner = InvalidOid;
        SetUserIdAndSecContext(save_user, save_sec);
    }
    PG_END_TRY();
}

// The caller, and whether the password rule applies to the conninfo it sets.
struct Caller {
    Oid role;
    bool superuser;
};

Caller IdentifyCaller(const RegistryAccess &access)
{
    Caller c{GetUserId(), false};
    if (access.has_owner_column) {
        c.superuser = superuser_arg(c.role);
    } else {
        // The 0.1.0 definitions are SECURITY DEFINER: GetUserId() is their owner, not the
        // caller. Only a session whose own role is a superuser may use them until the
        // extension is updated (the update records existing nodes as superuser-owned).
        if (!superuser_arg(GetOuterUserId()))
            ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                            errmsg("pg_peerpool's catalog is older than its library"),
                            errdetail("Until the update, only superusers may change the registry."),
                            errhint("Run ALTER EXTENSION pg_peerpool UPDATE.")));
        c.superuser = true;
    }
    return c;
}

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
        ereport(ERROR,
                (errcode(ERRCODE_DUPLICATE_OBJECT), errmsg("node \"%s\" already exists", name),
                 errhint("Use pool_alter_node() to change it.")));

    // read_only = false: see rows added earlier in this same statement (e.g. several
    // pool_add_node calls in one SELECT), or they would slip past the limit.
    if (SPI_execute("SELECT count(*) FROM peerpool.node", false, 0) != SPI_OK_SELECT)
        elog(ERROR, "could not count nodes");
    bool isnull = false;
    int64 count = DatumGetInt64(
        SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
    if (count >= peerpool_max_nodes)
        ereport(ERROR, (errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
                        errmsg("cannot add node \"%s\": peerpool.max_nodes (%d) reached", name,
                               peerpool_max_nodes),
                        errhint("Remove a node, or raise peerpool.max_nodes and restart the "
                                "server.")));

    Oid types[7] = {TEXTOID, TEXTOID, INT4OID, INT4OID, TEXTOID, INT4OID, BOOLOID};
    Datum values[7] = {CStringGetTextDatum(name), CStringGetTextDatum(conninfo),
                       Int32GetDatum(min_conn),   Int32GetDatum(max_conn),
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
                       Int32GetDatum(min_conn),   Int32GetDatum(max_conn),
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
    throw Error(ERRCODE_UNDEFINED_OBJECT, Format("node \"%s\" does not exist", name.c_str()), "",
                "The registered nodes are listed in peerpool.nodes.");
}

// Runs f() -- PostgreSQL calls only -- as the table's owner, recording `record_owner`.
template <typename F> void AsRegistryOwner(const RegistryAccess &access, Oid record_owner, F &&f)
{
    using Fn = std::remove_reference_t<F>;
    pg::Call([&] {
        RunAsRegistryOwner(
            access.owner, record_owner, [](void *p) { (*static_cast<Fn *>(p))(); },
            static_cast<void *>(&f));
    });
}

// BEFORE INSERT OR UPDATE row trigger body: sets NEW.conninfo_owner. PostgreSQL calls only.
Datum SetConninfoOwner(FunctionCallInfo fcinfo)
{
    if (!CALLED_AS_TRIGGER(fcinfo))
        elog(ERROR, "peerpool._node_conninfo_owner() must be called as a trigger");
    TriggerData *trigdata = (TriggerData *)fcinfo->context;
    if (!TRIGGER_FIRED_BEFORE(trigdata->tg_event) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
        elog(ERROR, "peerpool._node_conninfo_owner() must be a BEFORE ROW trigger");
    bool is_update = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event);
    HeapTuple tuple = is_update ? trigdata->tg_newtuple : trigdata->tg_trigtuple;
    TupleDesc desc = trigdata->tg_relation->rd_att;
    int owner_col = SPI_fnumber(desc, "conninfo_owner");
    int conninfo_col = SPI_fnumber(desc, "conninfo");
    if (owner_col <= 0 || conninfo_col <= 0)
        elog(ERROR, "peerpool.node has no conninfo or conninfo_owner column");

    Oid acting = GetUserId();
    bool isnull = false;
    Datum given = heap_getattr(tuple, owner_col, desc, &isnull);
    Oid owner;
    if (OidIsValid(pending_conninfo_owner)) {
        owner = pending_conninfo_owner; // pool_add_node / pool_alter_node with a conninfo
    } else if (!is_update) {
        // Direct INSERT (or a restore): a superuser may state the owner; anyone else owns it.
        owner = !isnull && superuser_arg(acting) ? DatumGetObjectId(given) : acting;
    } else {
        HeapTuple old = trigdata->tg_trigtuple;
        bool old_null = false, new_null = false;
        Datum old_conninfo = heap_getattr(old, conninfo_col, desc, &old_null);
        Datum new_conninfo = heap_getattr(tuple, conninfo_col, desc, &new_null);
        Datum old_owner = heap_getattr(old, owner_col, desc, &old_null);
        bool conninfo_same = !new_null && !old_null &&
                             datumIsEqual(old_conninfo, new_conninfo, false, -1);
        bool owner_same = !isnull && !old_null &&
                          DatumGetObjectId(old_owner) == DatumGetObjectId(given);
        if (conninfo_same && owner_same)
            return PointerGetDatum(tuple); // the conninfo was not set: its owner stays
        // Whoever sets the conninfo owns it; only a superuser may name another owner.
        owner = !owner_same && !isnull && superuser_arg(acting) ? DatumGetObjectId(given) : acting;
    }
    Datum value = ObjectIdGetDatum(owner);
    bool value_null = false;
    int cols[1] = {owner_col};
    return PointerGetDatum(heap_modify_tuple_by_cols(tuple, desc, 1, cols, &value, &value_null));
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
    RegistryAccess access = pg::Call([] { return LookupRegistry(); });
    Caller caller = pg::Call([&] { return IdentifyCaller(access); });
    if (!caller.superuser)
        ValidatePasswordRule(config.conninfo);

    AsRegistryOwner(access, caller.role, [&] {
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
    RegistryAccess access = pg::Call([] { return LookupRegistry(); });
    Caller caller = pg::Call([&] { return IdentifyCaller(access); });

    NodeRow row{};
    AsRegistryOwner(access, InvalidOid, [&] { row = ReadNodeForUpdateSpi(name.c_str()); });
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
    // Setting the conninfo makes the caller its owner, so the rule follows the caller.
    if (conninfo && !caller.superuser)
        ValidatePasswordRule(*conninfo);

    AsRegistryOwner(access, conninfo ? caller.role : InvalidOid, [&] {
        UpdateNodeSpi(config.name.c_str(), config.conninfo.c_str(), config.min_connections,
                      config.max_connections, RoleText(config.role), config.weight, config.enabled);
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

static Datum NodeConninfoOwner(FunctionCallInfo fcinfo)
{
    return pg::Call([&] { return SetConninfoOwner(fcinfo); });
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(pool_add_node, peerpool::PoolAddNode)
PEERPOOL_SQL_FUNCTION(pool_alter_node, peerpool::PoolAlterNode)
PEERPOOL_SQL_FUNCTION(pool_remove_node, peerpool::PoolRemoveNode)
PEERPOOL_SQL_FUNCTION(peerpool_node_conninfo_owner, peerpool::NodeConninfoOwner)
