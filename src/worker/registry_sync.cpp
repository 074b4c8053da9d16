// The pool manager's view of peerpool.node: load it from the catalog, mirror it into shared
// memory. Runs only in the pool manager.
#include "pg_peerpool/worker/registry_sync.hpp"

#include <map>

#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "access/xact.h"
#include "storage/condition_variable.h"
#include "catalog/namespace.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
}

namespace peerpool {

namespace {

// One catalog row, copied out of SPI into plain palloc'd memory.
struct RawNode {
    char *name;
    char *conninfo;
    int32 min_connections;
    int32 max_connections;
    char *role;
    int32 weight;
    bool enabled;
    bool password_required;
};

struct RawRegistry {
    bool extension_present;
    int count;
    RawNode *nodes;
};

// PostgreSQL calls only (run through pg::Call). Allocates the result in `target`.
RawRegistry LoadRawRegistry(MemoryContext target)
{
    RawRegistry out{false, 0, nullptr};
    SetCurrentStatementStartTimestamp();
    StartTransactionCommand();
    if (SPI_connect() != SPI_OK_CONNECT)
        elog(ERROR, "SPI_connect failed");
    PushActiveSnapshot(GetTransactionSnapshot());
    pgstat_report_activity(STATE_RUNNING, "loading the pg_peerpool node registry");

    out.extension_present = OidIsValid(get_extension_oid("pg_peerpool", true));
    if (out.extension_present) {
        // The password rule (SPEC section 2) is decided here, from whether the role that set
        // the conninfo is a superuser now (a dropped role: no). Before ALTER EXTENSION UPDATE
        // adds conninfo_owner, every node was registered by a superuser.
        Oid relid = get_relname_relid("node", get_namespace_oid("peerpool", false));
        bool has_owner = get_attnum(relid, "conninfo_owner") != InvalidAttrNumber;
        int rc = SPI_execute(
            has_owner ? "SELECT node_name, conninfo, min_connections, max_connections, role, "
                        "weight, enabled, NOT coalesce((SELECT r.rolsuper FROM "
                        "pg_catalog.pg_roles r WHERE r.oid = n.conninfo_owner::pg_catalog.oid), "
                        "false) FROM peerpool.node n ORDER BY node_name"
                      : "SELECT node_name, conninfo, min_connections, max_connections, role, "
                        "weight, enabled, false FROM peerpool.node ORDER BY node_name",
            true, 0);
        if (rc != SPI_OK_SELECT)
            elog(ERROR, "could not read peerpool.node: %s", SPI_result_code_string(rc));
        MemoryContext old = MemoryContextSwitchTo(target);
        out.count = static_cast<int>(SPI_processed);
        out.nodes = static_cast<RawNode *>(palloc0(sizeof(RawNode) * (out.count + 1)));
        for (int i = 0; i < out.count; i++) {
            HeapTuple tuple = SPI_tuptable->vals[i];
            TupleDesc desc = SPI_tuptable->tupdesc;
            bool isnull = false;
            RawNode &n = out.nodes[i];
            n.name = TextDatumGetCString(SPI_getbinval(tuple, desc, 1, &isnull));
            n.conninfo = TextDatumGetCString(SPI_getbinval(tuple, desc, 2, &isnull));
            n.min_connections = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
            n.max_connections = DatumGetInt32(SPI_getbinval(tuple, desc, 4, &isnull));
            n.role = TextDatumGetCString(SPI_getbinval(tuple, desc, 5, &isnull));
            n.weight = DatumGetInt32(SPI_getbinval(tuple, desc, 6, &isnull));
            n.enabled = DatumGetBool(SPI_getbinval(tuple, desc, 7, &isnull));
            n.password_required = DatumGetBool(SPI_getbinval(tuple, desc, 8, &isnull));
        }
        MemoryContextSwitchTo(old);
    }

    SPI_finish();
    PopActiveSnapshot();
    CommitTransactionCommand();
    pgstat_report_activity(STATE_IDLE, nullptr);
    return out;
}

NodeRole RoleFromText(const char *role)
{
    std::string r = role ? role : "";
    if (r == "primary")
        return NODE_ROLE_PRIMARY;
    if (r == "standby")
        return NODE_ROLE_STANDBY;
    return NODE_ROLE_AUTO;
}

} // namespace

Registry LoadRegistry()
{
    MemoryContext scratch = pg::Call([] {
        return AllocSetContextCreate(TopMemoryContext, "pg_peerpool registry load",
                                     ALLOCSET_DEFAULT_SIZES);
    });
    Registry registry;
    try {
        RawRegistry raw = pg::Call([&] { return LoadRawRegistry(scratch); });
        registry.extension_present = raw.extension_present;
        for (int i = 0; i < raw.count; i++) {
            const RawNode &r = raw.nodes[i];
            NodeConfig config;
            config.name = r.name;
            config.conninfo = r.conninfo;
            config.min_connections = r.min_connections;
            config.max_connections = r.max_connections;
            config.role = RoleFromText(r.role);
            config.weight = r.weight;
            config.enabled = r.enabled;
            config.password_required = r.password_required;
            registry.nodes.push_back(std::move(config));
        }
    } catch (...) {
        // Leave no transaction, SPI connection or scratch memory behind; the caller retries.
        pg::Call([&] {
            AbortOutOfAnyTransaction();
            MemoryContextDelete(scratch);
            pgstat_report_activity(STATE_IDLE, nullptr);
        });
        throw;
    }
    // MemoryContextDelete only frees memory; it cannot error.
    MemoryContextDelete(scratch);
    return registry;
}

RegistryDiff DiffRegistry(const std::vector<NodeConfig> &before,
                          const std::vector<NodeConfig> &after)
{
    RegistryDiff diff;
    std::map<std::string, const NodeConfig *> old_by_name;
    for (const NodeConfig &n : before)
        old_by_name[n.name] = &n;
    for (const NodeConfig &n : after) {
        auto it = old_by_name.find(n.name);
        if (it == old_by_name.end()) {
            diff.added.push_back(n);
            continue;
        }
        const NodeConfig &o = *it->second;
        // A change of the password rule recycles connections like a new conninfo.
        bool conninfo_changed = o.conninfo != n.conninfo ||
                                o.password_required != n.password_required;
        if (conninfo_changed)
            diff.conninfo_changed.push_back(n.name);
        if (conninfo_changed || o.min_connections != n.min_connections ||
            o.max_connections != n.max_connections || o.role != n.role || o.weight != n.weight ||
            o.enabled != n.enabled)
            diff.changed.push_back(n);
        old_by_name.erase(it);
    }
    for (const auto &[name, config] : old_by_name)
        diff.removed.push_back(name);
    return diff;
}

std::vector<std::string> MirrorRegistry(const Registry &registry, uint64 generation)
{
    SharedState &state = RequireShared();
    // std::less<> lets find() take the slot's char array without building a std::string.
    std::map<std::string, const NodeConfig *, std::less<>> wanted;
    for (const NodeConfig &n : registry.nodes)
        wanted[n.name] = &n;

    std::vector<std::string> mirrored;
    std::vector<std::string> skipped;
    mirrored.reserve(wanted.size());
    // GetCurrentTimestamp cannot error.
    TimestampTz now = GetCurrentTimestamp();

    // Only lookups and plain stores under the lock: nothing here allocates, throws or
    // ereports (all containers are built before, logging happens after release).
    std::vector<bool> placed(registry.nodes.size(), false);
    // LWLockAcquire can only fail when too many LWLocks are held; we hold none.
    LWLockAcquire(state.lock, LW_EXCLUSIVE);
    for (int i = 0; i < state.max_nodes; i++) {
        NodeSlot &slot = state.nodes[i];
        if (!slot.in_use)
            continue;
        auto it = wanted.find(static_cast<const char *>(slot.name));
        if (it == wanted.end()) {
            // Removed from the catalog: the pool manager drains the node and frees the slot.
            continue;
        }
        const NodeConfig &c = *it->second;
        slot.min_connections = c.min_connections;
        slot.max_connections = c.max_connections;
        slot.weight = c.weight;
        slot.configured_role = c.role;
        slot.enabled = c.enabled;
        placed[static_cast<size_t>(&c - registry.nodes.data())] = true;
    }
    for (size_t k = 0; k < registry.nodes.size(); k++) {
        if (placed[k])
            continue;
        const NodeConfig &c = registry.nodes[k];
        for (int i = 0; i < state.max_nodes; i++) {
            NodeSlot &slot = state.nodes[i];
            if (slot.in_use)
                continue;
            InitNodeSlot(slot);
            slot.in_use = true;
            strlcpy(slot.name, c.name.c_str(), sizeof(slot.name));
            slot.min_connections = c.min_connections;
            slot.max_connections = c.max_connections;
            slot.weight = c.weight;
            slot.configured_role = c.role;
            slot.enabled = c.enabled;
            slot.state = NODE_STATE_DISCONNECTED;
            slot.state_since = now;
            placed[k] = true;
            break;
        }
    }
    state.loaded_generation = generation;
    state.registry_loaded_at = now;
    state.extension_present = registry.extension_present;
    LWLockRelease(state.lock);
    ConditionVariableBroadcast(&state.check_cv); // pool_check_health() may wait for this load

    for (size_t k = 0; k < registry.nodes.size(); k++) {
        if (placed[k])
            mirrored.push_back(registry.nodes[k].name);
        else
            skipped.push_back(registry.nodes[k].name);
    }
    for (const std::string &name : skipped)
        pg::Call([&] {
            ereport(WARNING,
                    (errmsg("pg_peerpool: node \"%s\" ignored: no free slot", name.c_str()),
                     errdetail("peerpool.max_nodes is %d.", state.max_nodes)));
        });
    return mirrored;
}

void FreeNodeSlot(const std::string &name)
{
    SharedState &state = RequireShared();
    LWLockAcquire(state.lock, LW_EXCLUSIVE);
    int i = FindNodeSlot(state, name.c_str());
    if (i >= 0)
        state.nodes[i].in_use = false;
    LWLockRelease(state.lock);
}

void ClearNodeSlots()
{
    SharedState &state = RequireShared();
    LWLockAcquire(state.lock, LW_EXCLUSIVE);
    for (int i = 0; i < state.max_nodes; i++)
        InitNodeSlot(state.nodes[i]);
    LWLockRelease(state.lock);
}

} // namespace peerpool
