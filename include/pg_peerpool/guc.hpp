// GUC variables (SPEC section 6). Defined in guc.cpp; all time values are milliseconds.
#pragma once

namespace peerpool {

enum LoadBalance {
    LOAD_BALANCE_ROUND_ROBIN,
    LOAD_BALANCE_LEAST_CONNECTIONS,
    LOAD_BALANCE_LATENCY,
    LOAD_BALANCE_WEIGHTED,
    LOAD_BALANCE_RANDOM,
};

void DefineGucs();

// The per-node timeout a call may use (SPEC section 5): `requested` is the call's timeout_ms
// (explicit_arg) or the session's peerpool.query_timeout. Non-superusers cannot go above the
// limit a superuser configured, nor to 0: an explicit timeout_ms throws Error(42501); a
// session value (above the limit only after a reload lowered it) is clamped.
int AllowedQueryTimeout(int requested, bool explicit_arg);

} // namespace peerpool

// Plain C variables so the GUC machinery can own them (they are written by guc.c).
extern "C" {
extern char *peerpool_database;
extern int peerpool_max_nodes;
extern int peerpool_health_check_interval;
extern int peerpool_health_check_timeout;
extern int peerpool_unhealthy_threshold;
extern int peerpool_healthy_threshold;
extern int peerpool_connect_timeout;
extern int peerpool_query_timeout;
extern int peerpool_acquire_timeout;
extern int peerpool_idle_timeout;
extern int peerpool_max_lifetime;
extern int peerpool_reconnect_backoff_initial;
extern int peerpool_reconnect_backoff_max;
extern int peerpool_degraded_latency;
extern int peerpool_unhealthy_latency;
extern int peerpool_degraded_lag;
extern int peerpool_unhealthy_lag;
extern int peerpool_load_balance;
extern bool peerpool_read_write_split;
extern int peerpool_drain_timeout;
extern char *peerpool_application_name;
extern char *peerpool_reset_query;
extern int peerpool_max_total_connections;
extern bool peerpool_notify_reason;
}
