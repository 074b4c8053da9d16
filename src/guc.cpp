// Every GUC of SPEC section 6: name, default, unit and context. Time GUCs are stored in ms.
#include "pg_peerpool/guc.hpp"

#include <climits>
#include <cstdlib>

#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "postgres.h"
#include "access/parallel.h"
#include "access/xact.h"
#include "miscadmin.h"
#include "utils/guc.h"
}

char *peerpool_database = nullptr;
int peerpool_max_nodes = 64;
int peerpool_health_check_interval = 5000;
int peerpool_health_check_timeout = 2000;
int peerpool_unhealthy_threshold = 3;
int peerpool_healthy_threshold = 1;
int peerpool_connect_timeout = 5000;
int peerpool_query_timeout = 30000;
int peerpool_acquire_timeout = 30000;
int peerpool_idle_timeout = 300000;
int peerpool_max_lifetime = 1800000;
int peerpool_reconnect_backoff_initial = 1000;
int peerpool_reconnect_backoff_max = 30000;
int peerpool_degraded_latency = 70;
int peerpool_unhealthy_latency = 5000;
int peerpool_degraded_lag = 5000;
int peerpool_unhealthy_lag = 30000;
int peerpool_load_balance = peerpool::LOAD_BALANCE_ROUND_ROBIN;
bool peerpool_read_write_split = true;
int peerpool_drain_timeout = 10000;
char *peerpool_application_name = nullptr;
char *peerpool_reset_query = nullptr;
int peerpool_max_total_connections = 0;
bool peerpool_notify_reason = true;

namespace peerpool {

static const struct config_enum_entry load_balance_options[] = {
    {"round_robin", LOAD_BALANCE_ROUND_ROBIN, false},
    {"least_connections", LOAD_BALANCE_LEAST_CONNECTIONS, false},
    {"latency", LOAD_BALANCE_LATENCY, false},
    {"weighted", LOAD_BALANCE_WEIGHTED, false},
    {"random", LOAD_BALANCE_RANDOM, false},
    {nullptr, 0, false},
};

// ---- peerpool.query_timeout: a ceiling that only superusers may raise (SPEC section 5) ----
//
// The limit is the value last applied from a trusted source: the server's configuration
// (postgresql.conf, ALTER SYSTEM, the command line) or a SET by a superuser. Anything else --
// a non-superuser's SET or set_config(), PGOPTIONS, ALTER ROLE/DATABASE ... SET (a role may set
// those for itself) -- may lower the timeout but not raise it above the limit or disable it.
// The check hook knows the source; the assign hook records a trusted value as the new limit
// when it is applied (also when a rollback or RESET brings an earlier trusted value back), so
// a value that was only validated (ALTER SYSTEM, ALTER ROLE) never moves the limit.

static int query_timeout_limit = 30000; // 0: no limit (a superuser disabled the timeout)

struct QueryTimeoutExtra {
    bool trusted;
};

static bool TrustedSource(GucSource source)
{
    switch (source) {
    case PGC_S_DEFAULT:
    case PGC_S_DYNAMIC_DEFAULT:
    case PGC_S_ENV_VAR:
    case PGC_S_FILE:
    case PGC_S_ARGV:
    case PGC_S_GLOBAL:
    case PGC_S_OVERRIDE:
        return true;
    default:
        return false;
    }
}

static bool AboveLimit(int value, int limit) { return limit > 0 && (value == 0 || value > limit); }

// GUC check hook (called by guc.c, C only: it reports through GUC_check_* and returns false).
static bool CheckQueryTimeout(int *newval, void **extra, GucSource source)
{
    // A parallel worker restores the leader's values, which the leader already checked.
    bool trusted = TrustedSource(source) || InitializingParallelWorker ||
                   (IsTransactionState() && superuser());
    if (!trusted && AboveLimit(*newval, query_timeout_limit)) {
        GUC_check_errcode(ERRCODE_INSUFFICIENT_PRIVILEGE);
        GUC_check_errmsg("permission denied to raise \"peerpool.query_timeout\"");
        if (*newval == 0)
            GUC_check_errdetail("0 would disable the timeout; a superuser set it to %d ms.",
                                query_timeout_limit);
        else
            GUC_check_errdetail("%d ms is above the %d ms a superuser set.", *newval,
                                query_timeout_limit);
        GUC_check_errhint("Any role may lower peerpool.query_timeout; only a superuser may raise "
                          "or disable it.");
        return false;
    }
    auto *e = static_cast<QueryTimeoutExtra *>(malloc(sizeof(QueryTimeoutExtra)));
    if (e == nullptr)
        return false; // guc.c reports out of memory
    e->trusted = trusted;
    *extra = e;
    return true;
}

static void AssignQueryTimeout(int newval, void *extra)
{
    if (extra != nullptr && static_cast<QueryTimeoutExtra *>(extra)->trusted)
        query_timeout_limit = newval;
}

int AllowedQueryTimeout(int requested, bool explicit_arg)
{
    if (!AboveLimit(requested, query_timeout_limit) || pg::Call([] { return superuser(); }))
        return requested;
    if (!explicit_arg) // SET before a reload lowered the limit: the limit wins
        return query_timeout_limit;
    throw Error(ERRCODE_INSUFFICIENT_PRIVILEGE, "permission denied to raise the query timeout",
                requested == 0
                    ? Format("timeout_ms => 0 would disable the timeout; a superuser set "
                             "peerpool.query_timeout to %d ms.",
                             query_timeout_limit)
                    : Format("timeout_ms => %d is above the %d ms a superuser set in "
                             "peerpool.query_timeout.",
                             requested, query_timeout_limit),
                "Any role may lower the timeout; only a superuser may raise or disable it.");
}

static void DefineMs(const char *name, const char *desc, int *var, int boot, int min,
                     GucContext context = PGC_SIGHUP)
{
    DefineCustomIntVariable(name, desc, nullptr, var, boot, min, INT_MAX, context, GUC_UNIT_MS,
                            nullptr, nullptr, nullptr);
}

// Called from _PG_init in the postmaster (and in EXEC_BACKEND children); cannot fail except
// on out-of-memory, which PostgreSQL reports as FATAL at startup.
void DefineGucs()
{
    DefineCustomStringVariable("peerpool.database",
                               "Database the pool manager connects to and "
                               "the only one where the extension can be created.",
                               nullptr, &peerpool_database, "postgres", PGC_POSTMASTER, 0, nullptr,
                               nullptr, nullptr);
    DefineCustomIntVariable("peerpool.max_nodes", "Maximum number of registered nodes.", nullptr,
                            &peerpool_max_nodes, 64, 1, 10000, PGC_POSTMASTER, 0, nullptr, nullptr,
                            nullptr);
    DefineMs("peerpool.health_check_interval", "Time between health checks of each node.",
             &peerpool_health_check_interval, 5000, 10);
    DefineMs("peerpool.health_check_timeout", "Deadline of one health check.",
             &peerpool_health_check_timeout, 2000, 10);
    DefineCustomIntVariable("peerpool.unhealthy_threshold",
                            "Consecutive failed checks that make a node unhealthy.", nullptr,
                            &peerpool_unhealthy_threshold, 3, 1, 1000, PGC_SIGHUP, 0, nullptr,
                            nullptr, nullptr);
    DefineCustomIntVariable("peerpool.healthy_threshold",
                            "Consecutive good checks that make a recovering node healthy.", nullptr,
                            &peerpool_healthy_threshold, 1, 1, 1000, PGC_SIGHUP, 0, nullptr,
                            nullptr, nullptr);
    DefineMs("peerpool.connect_timeout", "Deadline for opening one connection to a node.",
             &peerpool_connect_timeout, 5000, 10);
    DefineCustomIntVariable("peerpool.query_timeout",
                            "Default per-node deadline of pool_query and parallel_query (0 "
                            "disables).",
                            "Any role may lower it; only superusers may raise or disable it.",
                            &peerpool_query_timeout, 30000, 0, INT_MAX, PGC_USERSET, GUC_UNIT_MS,
                            CheckQueryTimeout, AssignQueryTimeout, nullptr);
    DefineMs("peerpool.acquire_timeout", "How long a caller waits for a connection of a full pool.",
             &peerpool_acquire_timeout, 30000, 0, PGC_USERSET);
    DefineMs("peerpool.idle_timeout",
             "Idle connections above min_connections are closed after this long.",
             &peerpool_idle_timeout, 300000, 0);
    DefineMs("peerpool.max_lifetime", "Connections are replaced after this long (0 disables).",
             &peerpool_max_lifetime, 1800000, 0);
    DefineMs("peerpool.reconnect_backoff_initial", "First reconnect delay after a failure.",
             &peerpool_reconnect_backoff_initial, 1000, 1);
    DefineMs("peerpool.reconnect_backoff_max", "Cap of the doubling reconnect delay.",
             &peerpool_reconnect_backoff_max, 30000, 1);
    DefineMs("peerpool.degraded_latency", "Smoothed check latency above which a node is degraded.",
             &peerpool_degraded_latency, 70, 0);
    DefineMs("peerpool.unhealthy_latency", "Check latency above which a check counts as failed.",
             &peerpool_unhealthy_latency, 5000, 0);
    DefineMs("peerpool.degraded_lag", "Standby replay lag above which a node is degraded.",
             &peerpool_degraded_lag, 5000, 0);
    DefineMs("peerpool.unhealthy_lag", "Standby replay lag above which a check counts as failed.",
             &peerpool_unhealthy_lag, 30000, 0);
    DefineCustomEnumVariable("peerpool.load_balance", "How pool_query picks among candidates.",
                             nullptr, &peerpool_load_balance, LOAD_BALANCE_ROUND_ROBIN,
                             load_balance_options, PGC_SIGHUP, 0, nullptr, nullptr, nullptr);
    DefineCustomBoolVariable("peerpool.read_write_split",
                             "Prefer standbys for pool_query target 'read'.", nullptr,
                             &peerpool_read_write_split, true, PGC_SIGHUP, 0, nullptr, nullptr,
                             nullptr);
    DefineMs("peerpool.drain_timeout",
             "How long in-flight work may finish when a node is removed or at shutdown.",
             &peerpool_drain_timeout, 10000, 0);
    DefineCustomStringVariable("peerpool.application_name",
                               "application_name of the pool manager's connections.", nullptr,
                               &peerpool_application_name, "pg_peerpool", PGC_SIGHUP, 0, nullptr,
                               nullptr, nullptr);
    DefineCustomStringVariable("peerpool.reset_query",
                               "SQL run on a connection after each caller's query (empty: none).",
                               nullptr, &peerpool_reset_query, "DISCARD ALL", PGC_SIGHUP, 0,
                               nullptr, nullptr, nullptr);
    DefineCustomBoolVariable("peerpool.notify_reason",
                             "Include the reason (host names, libpq errors) in the payload of "
                             "NOTIFY peerpool_events.",
                             "Any role that can connect to the database may LISTEN.",
                             &peerpool_notify_reason, true, PGC_SIGHUP, 0, nullptr, nullptr,
                             nullptr);
    DefineCustomIntVariable("peerpool.max_total_connections",
                            "Cap on connections across all nodes (0: only per-node caps).", nullptr,
                            &peerpool_max_total_connections, 0, 0, 100000, PGC_POSTMASTER, 0,
                            nullptr, nullptr, nullptr);
    MarkGUCPrefixReserved("peerpool");
}

} // namespace peerpool
