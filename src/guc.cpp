// Every GUC of SPEC section 6: name, default, unit and context. Time GUCs are stored in ms.
#include "pg_peerpool/guc.hpp"

#include <climits>

extern "C" {
#include "postgres.h"
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

namespace peerpool {

static const struct config_enum_entry load_balance_options[] = {
    {"round_robin", LOAD_BALANCE_ROUND_ROBIN, false},
    {"least_connections", LOAD_BALANCE_LEAST_CONNECTIONS, false},
    {"latency", LOAD_BALANCE_LATENCY, false},
    {"weighted", LOAD_BALANCE_WEIGHTED, false},
    {"random", LOAD_BALANCE_RANDOM, false},
    {nullptr, 0, false},
};

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
    DefineCustomStringVariable("peerpool.database", "Database the pool manager connects to and "
                               "the only one where the extension can be created.",
                               nullptr, &peerpool_database, "postgres", PGC_POSTMASTER, 0,
                               nullptr, nullptr, nullptr);
    DefineCustomIntVariable("peerpool.max_nodes", "Maximum number of registered nodes.", nullptr,
                            &peerpool_max_nodes, 64, 1, 10000, PGC_POSTMASTER, 0, nullptr,
                            nullptr, nullptr);
    DefineMs("peerpool.health_check_interval", "Time between health checks of each node.",
             &peerpool_health_check_interval, 5000, 10);
    DefineMs("peerpool.health_check_timeout", "Deadline of one health check.",
             &peerpool_health_check_timeout, 2000, 10);
    DefineCustomIntVariable("peerpool.unhealthy_threshold",
                            "Consecutive failed checks that make a node unhealthy.", nullptr,
                            &peerpool_unhealthy_threshold, 3, 1, 1000, PGC_SIGHUP, 0, nullptr,
                            nullptr, nullptr);
    DefineCustomIntVariable("peerpool.healthy_threshold",
                            "Consecutive good checks that make a recovering node healthy.",
                            nullptr, &peerpool_healthy_threshold, 1, 1, 1000, PGC_SIGHUP, 0,
                            nullptr, nullptr, nullptr);
    DefineMs("peerpool.connect_timeout", "Deadline for opening one connection to a node.",
             &peerpool_connect_timeout, 5000, 10);
    DefineMs("peerpool.query_timeout",
             "Default per-node deadline of pool_query and parallel_query (0 disables).",
             &peerpool_query_timeout, 30000, 0, PGC_USERSET);
    DefineMs("peerpool.acquire_timeout",
             "How long a caller waits for a connection of a full pool.",
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
    DefineMs("peerpool.unhealthy_latency",
             "Check latency above which a check counts as failed.",
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
                               "SQL run on a connection when it returns to the pool (empty: none).",
                               nullptr, &peerpool_reset_query, "", PGC_SIGHUP, 0, nullptr,
                               nullptr, nullptr);
    DefineCustomIntVariable("peerpool.max_total_connections",
                            "Cap on connections across all nodes (0: only per-node caps).",
                            nullptr, &peerpool_max_total_connections, 0, 0, 100000,
                            PGC_POSTMASTER, 0, nullptr, nullptr, nullptr);
    MarkGUCPrefixReserved("peerpool");
}

} // namespace peerpool
