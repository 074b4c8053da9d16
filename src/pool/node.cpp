// One node's pool and health state machine. See include/pg_peerpool/pool/node.hpp for the
// states and transitions; every transition below carries its reason into peerpool.events.
#include "pg_peerpool/pool/node.hpp"

#include <algorithm>
#include <cstdlib>
#include <functional>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "common/pg_prng.h"
#include "storage/condition_variable.h"
#include "storage/fd.h"
#include "utils/timestamp.h"
}

namespace peerpool {

namespace {

// One round trip answers: alive, role, (on a standby) replay lag, and whether a new session
// would be read-only. Lag is 0 when everything received has been replayed, else the age of the
// last replayed transaction. The third column is default_transaction_read_only as a new
// session gets it (CheckSql resets it first): HA managers such as pg_auto_failover promote a
// standby with it on, and keep it on until the old primary is demoted, so that clients asking
// for a read-write server (libpq's target_session_attrs=read-write) wait.
const char *kCheckSql = "SELECT pg_catalog.pg_is_in_recovery(), "
                        "CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN NULL "
                        "WHEN pg_catalog.pg_last_wal_receive_lsn() IS NOT DISTINCT FROM "
                        "pg_catalog.pg_last_wal_replay_lsn() THEN 0 "
                        "ELSE COALESCE(EXTRACT(EPOCH FROM pg_catalog.clock_timestamp() - "
                        "pg_catalog.pg_last_xact_replay_timestamp()) * 1000, 0) END, "
                        "pg_catalog.current_setting('default_transaction_read_only')::boolean";

// The check must not depend on what callers left in the session (SPEC section 5), whatever
// peerpool.reset_query is: it runs in the implicit transaction of its own query string, whose
// first statements undo a caller's statement_timeout, lock_timeout, role, search_path and
// default isolation level (serializable fails on a standby) until the string ends.
std::string CheckSql()
{
    return Format("SET LOCAL statement_timeout = %d; SET LOCAL lock_timeout = 0; "
                  "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; SET LOCAL ROLE NONE; "
                  "SET LOCAL search_path = pg_catalog; "
                  "SET LOCAL default_transaction_read_only = DEFAULT; %s",
                  peerpool_health_check_timeout, kCheckSql);
}

constexpr int kTcpUserTimeoutMs = 10000;
constexpr double kLatencySmoothing = 0.3; // weight of the newest sample in the moving average
constexpr int kMaxStormSamples = 3;       // storm samples set aside in a row (CheckSucceeded)
// A check or a growth connection that a local limit (the fleet budget, our descriptors) or the
// node's own connection limit refused is tried again after this long: never a busy loop.
constexpr long kLocalLimitRetryMs = 250;
constexpr long kGrowthRetryMs = 1000;

// The server refused a new session for lack of slots (SQLSTATE 53300; libpq gives a connection
// attempt's error as text only, so the server's English messages are matched). The node
// answers: that is its capacity, not its health.
bool RefusedForCapacity(const std::string &error)
{
    return error.find("too many clients already") != std::string::npos ||
           error.find("remaining connection slots are reserved") != std::string::npos;
}

// Every sum of GUC milliseconds is taken in 64 bits: each GUC may be INT_MAX on its own.
TimestampTz After(TimestampTz t, int64 ms) { return t + ms * INT64CONST(1000); }
double MsBetween(TimestampTz from, TimestampTz to)
{
    return static_cast<double>(to - from) / 1000.0;
}

SharedState &State() { return RequireShared(); }

} // namespace

Node::Node(Fleet &fleet, NodeConfig config, int slot, TimestampTz now, bool at_startup)
    : fleet_(fleet), config_(std::move(config)), slot_(slot), loaded_at_startup_(at_startup),
      state_since_(now), phase_seed_(std::hash<std::string>()(config_.name))
{
    MarkDirty(); // its first Manage starts it
}

Node::~Node()
{
    CloseAll();
    fleet_.BudgetWaitEnded(this);
    fleet_.NodeGone(this);
}

void Node::MarkDirty()
{
    dirty_ = true;
    if (!managing_ && !loop.in_dirty_list) {
        loop.in_dirty_list = true;
        fleet_.NodeDirty(this);
    }
}

void Node::InterestChanged()
{
    if (!loop.sockets_changed) {
        loop.sockets_changed = true;
        fleet_.NodeSocketsChanged(this);
    }
}

bool Node::CheckRequested() const
{
    return pg_atomic_read_u64(&Slot().check_requested) >
           pg_atomic_read_u64(&Slot().check_completed);
}

NodeSlot &Node::Slot() const { return State().nodes[slot_]; }

bool Node::Serving() const
{
    return state_ == NODE_STATE_HEALTHY || state_ == NODE_STATE_DEGRADED ||
           state_ == NODE_STATE_TRANSITIONING;
}

void Node::Transition(NodeState to, const std::string &reason, TimestampTz now)
{
    NodeState from = state_;
    state_ = to;
    if (from != to)
        state_since_ = now;
    fleet_.events().Record(config_.name, from, to, reason, now);
    Publish();
}

// ---- connections ---------------------------------------------------------------------------

Connection *Node::OpenConnection(TimestampTz now, bool for_check, TimestampTz waiter_since)
{
    bool evict = for_check; // demand may evict another node's idle connection; upkeep may not
    if (!fleet_.MayStartConnecting())
        return nullptr; // a local limit: tried again shortly (kLocalLimitRetryMs)
    if (!fleet_.ReserveConnection(this, evict, waiter_since))
        return nullptr;
    ConnOptions options;
    std::string invalid;
    try {
        options = ConnectionOptions(config_.conninfo, peerpool_application_name, kTcpUserTimeoutMs);
    } catch (const Error &e) {
        invalid = e.message() + (e.detail().empty() ? "" : ": " + e.detail());
    }
    // Host names are resolved off the loop (resolver.hpp); until then the connection waits,
    // under its connect deadline, without a socket.
    std::string resolve_error;
    ResolveStatus resolved = RESOLVE_READY;
    ConnOptions unresolved = options;
    if (invalid.empty())
        resolved = fleet_.resolver().Resolve(options, now, resolve_error);
    std::unique_ptr<Connection> conn;
    TimestampTz deadline = After(now, peerpool_connect_timeout);
    if (resolved == RESOLVE_PENDING)
        conn = std::make_unique<Connection>(fleet_.NextConnectionId(), now, deadline,
                                            std::move(unresolved));
    else if (invalid.empty() && resolved == RESOLVE_READY)
        conn = std::make_unique<Connection>(fleet_.NextConnectionId(), options, now, deadline);
    else
        conn = std::make_unique<Connection>(fleet_.NextConnectionId(), now, deadline,
                                            ConnOptions());
    conn->require_password = config_.password_required;
    if (!invalid.empty())
        conn->MarkBroken(invalid);
    else if (resolved == RESOLVE_FAILED)
        conn->MarkBroken(resolve_error);
    Connection *raw = conn.get();
    if (raw->state() == CONN_STATE_CONNECTING) {
        raw->counted_connecting = true;
        fleet_.ConnectingChanged(1);
    }
    raw->set_listener(this);
    conns_.push_back(std::move(conn));
    InterestChanged();
    return raw;
}

void Node::SettleConnecting(Connection *conn)
{
    if (conn->counted_connecting && conn->state() != CONN_STATE_CONNECTING) {
        conn->counted_connecting = false;
        fleet_.ConnectingChanged(-1);
    }
}

void Node::CloseConnection(uint64 id, bool recycled)
{
    auto it = std::find_if(conns_.begin(), conns_.end(),
                           [&](const auto &c) { return c->id() == id; });
    if (it == conns_.end())
        return;
    if ((*it)->ever_connected()) {
        pg_atomic_fetch_add_u64(&Slot().closed, 1);
        if (recycled)
            pg_atomic_fetch_add_u64(&Slot().recycled, 1);
    }
    if (check_phase_ != CHECK_NONE && check_conn_ == id)
        check_phase_ = CHECK_NONE;
    if ((*it)->counted_connecting) {
        (*it)->counted_connecting = false;
        fleet_.ConnectingChanged(-1);
    }
    std::string error = (*it)->error();
    jobs_.erase(id);
    held_for_cancel_.erase(id);
    // A cancel still on its way to this session stays counted until it finishes: it carries
    // the session's secret key, so it can hit no other process.
    check_starved_ = false; // a slot is free again: a due check may open a connection
    full_since_ = 0;
    LeaseOwner lost;
    auto lease = leases_.find(id);
    if (lease != leases_.end()) {
        lost = lease->second.owner;
        leases_.erase(lease);
    }
    conns_.erase(it); // PQfinish
    InterestChanged();
    fleet_.ReleaseConnection();
    if (lost.valid()) {
        pg_atomic_fetch_add_u64(&Slot().queries, 1);
        pg_atomic_fetch_add_u64(&Slot().errors, 1);
    }
    if (lost.valid())
        fleet_.LeaseLost(lost, error.empty() ? "connection closed" : error, GetCurrentTimestamp());
}

void Node::CloseAll()
{
    while (!conns_.empty())
        CloseConnection(conns_.back()->id(), false);
    check_phase_ = CHECK_NONE;
}

Connection *Node::FindConnection(uint64 id) const
{
    for (const auto &c : conns_)
        if (c->id() == id)
            return c.get();
    return nullptr;
}

// An idle connection whose session the peer has not ended: what already arrived on its socket
// (a FATAL "terminating connection", EOF) is read first, and a dead one is closed, not handed
// to a caller or a check.
Connection *Node::LiveIdleConnection(TimestampTz now, bool read_socket)
{
    for (;;) {
        Connection *idle = IdleConnection();
        if (idle == nullptr || idle->StillAlive(read_socket))
            return idle;
        HandleBrokenConnection(idle, now);
    }
}

Connection *Node::IdleConnection() const
{
    // Most recently used first: keeps the others idle long enough to be trimmed.
    Connection *best = nullptr;
    for (const auto &c : conns_)
        if (c->state() == CONN_STATE_IDLE && !c->recycle_requested && jobs_.count(c->id()) == 0 &&
            held_for_cancel_.count(c->id()) == 0 &&
            (best == nullptr || c->last_used() > best->last_used()))
            best = c.get();
    return best;
}

int Node::ConnectionCount(ConnState state) const
{
    return static_cast<int>(std::count_if(conns_.begin(), conns_.end(),
                                          [&](const auto &c) { return c->state() == state; }));
}

bool Node::OldestIdle(TimestampTz &lru) const
{
    bool found = false;
    for (const auto &c : conns_)
        if (c->state() == CONN_STATE_IDLE && (!found || c->last_used() < lru)) {
            lru = c->last_used();
            found = true;
        }
    return found;
}

bool Node::CloseOldestIdle()
{
    MarkDirty();
    TimestampTz lru = 0;
    if (!OldestIdle(lru))
        return false;
    for (const auto &c : conns_)
        if (c->state() == CONN_STATE_IDLE && c->last_used() == lru) {
            CloseConnection(c->id(), false);
            return true;
        }
    return false;
}

void Node::LogNotices(Connection *conn)
{
    for (const std::string &notice : conn->TakeNotices())
        pg::Call([&] {
            ereport(LOG, (errmsg_internal("pg_peerpool: node \"%s\": remote notice: %s",
                                          config_.name.c_str(), notice.c_str())));
        });
}

// ---- configuration -------------------------------------------------------------------------

void Node::Reconfigure(const NodeConfig &config, TimestampTz now)
{
    MarkDirty();
    bool conninfo_changed = config.conninfo != config_.conninfo ||
                            config.password_required != config_.password_required;
    bool was_enabled = config_.enabled;
    config_ = config;

    if (was_enabled && !config_.enabled) {
        FailWaiters(ERRCODE_CONNECTION_FAILURE, "node disabled", now);
        CloseAll();
        retry_attempt_ = 0;
        next_retry_at_ = 0;
        consecutive_failures_ = 0;
        Transition(NODE_STATE_DISCONNECTED, "node disabled", now);
        return;
    }
    if (conninfo_changed) {
        // New connection settings: no connection made with the old ones is handed out again.
        std::vector<uint64> to_close;
        for (const auto &c : conns_) {
            if (c->state() == CONN_STATE_CHECKING || c->state() == CONN_STATE_BUSY)
                c->recycle_requested = true; // replaced once its current work is done
            else
                to_close.push_back(c->id());
        }
        for (uint64 id : to_close)
            CloseConnection(id, true);
        next_check_at_ = now;
        if (state_ == NODE_STATE_UNHEALTHY)
            next_retry_at_ = now; // new settings: try them at once
    }
    // A lowered max_connections: trim idle connections above it now.
    while (static_cast<int>(conns_.size()) > config_.max_connections && CloseOldestIdle()) {
    }
}

void Node::StartDraining(TimestampTz now)
{
    MarkDirty();
    drain_deadline_ = After(now, peerpool_drain_timeout);
    Transition(NODE_STATE_DRAINING, "node removed", now);
    FailWaiters(ERRCODE_CONNECTION_FAILURE, "node removed", now);
    // In-flight queries may finish until drain_timeout; everything else closes now.
    std::vector<uint64> to_close;
    for (const auto &c : conns_)
        if (c->state() != CONN_STATE_BUSY || leases_.count(c->id()) == 0 ||
            !leases_[c->id()].owner.valid())
            to_close.push_back(c->id());
    for (uint64 id : to_close)
        CloseConnection(id, false);
    CompleteCheckRequests(true);
}

// ---- health checks -------------------------------------------------------------------------

void Node::StartCheck(TimestampTz now)
{
    check_request_target_ = pg_atomic_read_u64(&Slot().check_requested);
    check_started_ = now;
    bool attempt = !Serving(); // connecting or reconnecting: connect + check
    check_deadline_ = After(now, static_cast<int64>(peerpool_health_check_timeout) +
                                     (attempt ? peerpool_connect_timeout : 0));
    // No read of the socket first (one system call per check, 200 a second with 1,000 nodes):
    // the loop watches idle sessions, and a check that finds its session gone is not counted
    // but run again at once (stale_session in OnSocketReady).
    if (Connection *idle = LiveIdleConnection(now, false)) {
        check_starved_ = false;
        full_since_ = 0;
        check_reused_ = true;
        RunCheckOn(idle, now);
        return;
    }
    if (state_ == NODE_STATE_DRAINING || state_ == NODE_STATE_DISCONNECTED)
        return; // LiveIdleConnection may have closed the last connection of a node going away
    // Every connection is busy (or there is none yet). Below max_connections the check opens a
    // pool connection. At max_connections it first waits for the next connection a caller
    // returns (ahead of waiting callers, GrantWaiting), so short calls never see more than
    // max_connections sessions; only when that has not happened within one check interval
    // (callers hold every connection in long queries) does it open one short-lived extra
    // connection, closed when the check is done (SPEC section 3: checks run on time whatever
    // callers do). The interval counts from when the check first found the node at
    // max_connections, not from an earlier wait on a local limit: connections just opened for
    // waiting callers come back within their calls.
    if (static_cast<int>(conns_.size()) >= config_.max_connections) {
        check_starved_ = true;
        if (full_since_ == 0)
            full_since_ = now;
        TimestampTz extra_at = After(full_since_, peerpool_health_check_interval);
        if (now < extra_at) {
            check_blocked_until_ = extra_at;
            return;
        }
    }
    Connection *conn = OpenConnection(now, true);
    if (conn == nullptr) {
        // A local limit (peerpool.max_total_connections spent by running queries, our file
        // descriptors, attempts in flight), not the node's failure: the check runs as soon as
        // a connection comes back, or tries again shortly. A pool still at max_connections
        // keeps its timer: the extra connection is tried again in 250 ms, not an interval.
        check_starved_ = true;
        if (static_cast<int>(conns_.size()) < config_.max_connections)
            full_since_ = 0;
        check_blocked_until_ = After(now, kLocalLimitRetryMs);
        return;
    }
    check_starved_ = false;
    full_since_ = 0;
    check_reused_ = false;
    check_phase_ = CHECK_CONNECTING;
    check_conn_ = conn->id();
    if (conn->state() == CONN_STATE_BROKEN)
        HandleBrokenConnection(conn, now);
}

void Node::RunCheckOn(Connection *conn, TimestampTz now)
{
    check_phase_ = CHECK_RUNNING;
    check_conn_ = conn->id();
    check_started_ = now;
    check_in_storm_ = fleet_.ConnectionStorm();
    // The latency is measured from here (not from the pass's earlier `now`) to the kernel's
    // arrival stamp of the answer (see FinishCheck).
    check_sent_ = GetCurrentTimestamp();
    check_arrival_ = 0;
    if (!conn->SendQuery(CheckSql(), now, check_deadline_))
        HandleBrokenConnection(conn, now);
}

void Node::FinishCheck(const QueryOutcome &outcome, bool connection_lost, TimestampTz now)
{
    // Until the answer reached this host, when the kernel said (TCP), else until we read it.
    // On a busy host the pool manager may get the CPU many milliseconds after the answer
    // arrived (with 1,000 peer backends on 2 CPUs, 10-25 ms): that delay is ours, not the
    // node's (SPEC section 3), and would make a whole fleet look degraded.
    bool stamped = check_arrival_ != 0 && check_arrival_ >= check_sent_ && check_arrival_ <= now;
    double latency = std::max(0.0, MsBetween(check_sent_, stamped ? check_arrival_ : now));
    if (!outcome.ok) {
        CheckFailed((connection_lost ? "connection lost during health check: "
                                     : "health check failed: ") +
                        outcome.error,
                    outcome.sqlstate, false, connection_lost, now);
        return;
    }
    if (outcome.rows.size() != 1 || outcome.rows[0].size() != 3) {
        CheckFailed("health check returned an unexpected result", "", false, false, now);
        return;
    }
    bool in_recovery = outcome.rows[0][0] == "t";
    double lag = outcome.nulls[0][1] ? -1 : std::atof(outcome.rows[0][1].c_str());
    read_only_ = !in_recovery && outcome.rows[0][2] == "t";
    CheckSucceeded(in_recovery, lag, latency, now);
}

void Node::CheckFailed(const std::string &error, const std::string &sqlstate, bool hard,
                       bool recheck_now, TimestampTz now)
{
    last_check_ = now;
    last_error_ = error;
    last_sqlstate_ = sqlstate;
    consecutive_failures_++;
    good_checks_ = 0;

    switch (state_) {
    case NODE_STATE_CONNECTING:
        // The first connection failed: nothing to serve with; rest in unhealthy until retry 1.
        retry_attempt_ = 0;
        ScheduleRetry(error, now);
        break;
    case NODE_STATE_RECONNECTING:
        // The attempt failed: back to unhealthy with the next, doubled delay.
        ScheduleRetry(Format("attempt %d failed: %s", retry_attempt_, error.c_str()), now);
        break;
    case NODE_STATE_HEALTHY:
    case NODE_STATE_DEGRADED:
    case NODE_STATE_TRANSITIONING:
        if (hard) {
            MarkUnhealthy(error, now);
        } else if (consecutive_failures_ >= peerpool_unhealthy_threshold) {
            MarkUnhealthy(Format("%d consecutive failed checks; last: %s", consecutive_failures_,
                                 error.c_str()),
                          now);
        } else {
            // Below the threshold: no transition (one slow check does not flap the node).
            next_check_at_ = recheck_now ? now : NextCheckTime(now);
            Publish();
        }
        break;
    default:
        Publish();
        break;
    }
    // Last: a pool_check_health() caller reads node_health as soon as it wakes.
    CompleteCheckRequests(false);
}

// When the next check is due: one interval after the last one started, moved to the nearest
// point of this node's own phase. The phases of a fleet are spread evenly over the interval,
// on a grid of interval/20 (at most 100 ms) so that the checks due together share one wake-up
// of the loop. Spread, because checks that bunch up (nodes registered or reconnected in a
// burst keep their bunch forever otherwise) reach the peers together and queue there: with
// 1,000 nodes on 10 local peers, bursts of 50 checks made the median check latency 35 ms
// against 0.6 ms for one check alone. A node's first check after a change of phase may come up
// to half an interval early or late; from then on they come exactly one interval apart.
TimestampTz Node::NextCheckTime(TimestampTz now) const
{
    TimestampTz due = After(check_started_, peerpool_health_check_interval);
    int64 interval_us = static_cast<int64>(peerpool_health_check_interval) * 1000;
    int64 grid_us = std::min<int64>(100 * 1000, interval_us / 20);
    if (grid_us <= 1 || due <= 0)
        return std::max(now, due);
    int64 slots = std::max<int64>(1, interval_us / grid_us);
    int64 phase_us = static_cast<int64>(phase_seed_ % static_cast<uint64>(slots)) * grid_us;
    int64 k = (due - phase_us + interval_us / 2) / interval_us; // due > 0, phase < interval
    return std::max(now, static_cast<TimestampTz>(k * interval_us + phase_us));
}

void Node::CheckSucceeded(bool in_recovery, double lag_ms, double latency_ms, TimestampTz now)
{
    NodeRole detected = in_recovery ? NODE_ROLE_STANDBY : NODE_ROLE_PRIMARY;
    // A check that opened its own connection ran the first query of a new backend: its time
    // includes that backend's start-up (catalog caches) and, with many nodes connecting at
    // once, the peers' load. When it is the node's only sample it is shown but cannot make the
    // node degraded, and the next sample from a pooled connection replaces it rather than
    // being averaged with it. From the second sample on, every sample counts.
    //
    // A check sent or answered while the pool manager itself has a connection storm in flight
    // (Fleet::ConnectionStorm: 8 attempts or more, at the start of a large fleet) measures
    // our own load -- backends being forked for us, handshakes on the same CPUs -- more than
    // the node's (SPEC section 3: local load is not the node's fault). Such a sample is shown
    // while the node has no other, and may lower an average but not raise it. Only
    // kMaxStormSamples in a row are set aside: a storm that never ends (many nodes down behind
    // a black hole, retrying) must not freeze the node's latency state.
    bool cold = !check_reused_;
    bool storm = (check_in_storm_ || fleet_.ConnectionStorm()) && storm_samples_ < kMaxStormSamples;
    storm_samples_ = storm ? storm_samples_ + 1 : 0;
    if (storm && latency_ms_ >= 0 && !latency_cold_ && latency_ms < latency_ms_) {
        latency_ms_ = (1 - kLatencySmoothing) * latency_ms_ + kLatencySmoothing * latency_ms;
    } else if (storm) {
        if (latency_ms_ < 0 || latency_cold_) {
            latency_ms_ = latency_ms;
            latency_cold_ = true;
        }
    } else if (latency_ms_ < 0) {
        latency_ms_ = latency_ms;
        latency_cold_ = cold;
    } else if (latency_cold_ && !cold) {
        latency_ms_ = latency_ms;
        latency_cold_ = false;
    } else {
        latency_ms_ = (1 - kLatencySmoothing) * latency_ms_ + kLatencySmoothing * latency_ms;
        latency_cold_ = false;
    }
    lag_ms_ = in_recovery ? std::max(lag_ms, 0.0) : -1;

    // A check that answered too slowly, or from a standby too far behind, counts as failed.
    if (peerpool_unhealthy_latency > 0 && latency_ms > peerpool_unhealthy_latency) {
        CheckFailed(Format("check took %.0f ms, above peerpool.unhealthy_latency (%d ms)",
                           latency_ms, peerpool_unhealthy_latency),
                    "", false, false, now);
        return;
    }
    if (in_recovery && peerpool_unhealthy_lag > 0 && lag_ms_ > peerpool_unhealthy_lag) {
        CheckFailed(Format("replication lag %.0f ms, above peerpool.unhealthy_lag (%d ms)", lag_ms_,
                           peerpool_unhealthy_lag),
                    "", false, false, now);
        return;
    }

    last_check_ = last_success_ = now;
    consecutive_failures_ = 0;
    next_check_at_ = NextCheckTime(now);
    CompleteCheckRequests(false);

    // Hysteresis: a degraded node becomes healthy only below 80 % of the thresholds, so a
    // value hovering around a threshold does not flap the state.
    double margin = state_ == NODE_STATE_DEGRADED ? 0.8 : 1.0;
    std::string degraded_reason;
    if (!latency_cold_ && peerpool_degraded_latency > 0 &&
        latency_ms_ > margin * peerpool_degraded_latency)
        degraded_reason = Format("smoothed latency %.1f ms above peerpool.degraded_latency (%d ms)",
                                 latency_ms_, peerpool_degraded_latency);
    else if (lag_ms_ >= 0 && peerpool_degraded_lag > 0 && lag_ms_ > margin * peerpool_degraded_lag)
        degraded_reason = Format("replication lag %.0f ms above peerpool.degraded_lag (%d ms)",
                                 lag_ms_, peerpool_degraded_lag);
    NodeState target = degraded_reason.empty() ? NODE_STATE_HEALTHY : NODE_STATE_DEGRADED;

    switch (state_) {
    case NODE_STATE_CONNECTING:
    case NODE_STATE_RECONNECTING:
        role_ = detected;
        good_checks_++;
        if (good_checks_ < peerpool_healthy_threshold) {
            Publish(); // recovering: wait for healthy_threshold good checks in a row
            break;
        }
        {
            std::string reason = state_ == NODE_STATE_CONNECTING
                                     ? Format("connected; %s detected", NodeRoleName(role_))
                                     : Format("recovered after %d failed attempt%s; %s detected",
                                              retry_attempt_, retry_attempt_ == 1 ? "" : "s",
                                              NodeRoleName(role_));
            retry_attempt_ = 0;
            next_retry_at_ = 0;
            if (state_ == NODE_STATE_RECONNECTING && role_before_ != NODE_ROLE_UNKNOWN &&
                role_before_ != role_) {
                // Its role changed while it was down (an old primary coming back as a standby
                // after a failover, a standby promoted during an outage): a role change like
                // any other, confirmed by the next check before anything new is routed to it.
                Transition(NODE_STATE_TRANSITIONING,
                           reason + Format("; role changed from %s to %s while down",
                                           NodeRoleName(role_before_), NodeRoleName(role_)),
                           now);
                break;
            }
            if (!degraded_reason.empty())
                reason += "; " + degraded_reason;
            Transition(target, reason, now);
        }
        break;
    case NODE_STATE_TRANSITIONING:
        if (detected == role_) {
            Transition(target, Format("role %s confirmed", NodeRoleName(role_)), now);
        } else {
            NodeRole old = role_;
            role_ = detected;
            Transition(NODE_STATE_TRANSITIONING,
                       Format("role changed again from %s to %s", NodeRoleName(old),
                              NodeRoleName(detected)),
                       now);
        }
        break;
    case NODE_STATE_HEALTHY:
    case NODE_STATE_DEGRADED:
        if (role_ != NODE_ROLE_UNKNOWN && detected != role_) {
            NodeRole old = role_;
            role_ = detected;
            // Route nothing new until the next check confirms the new role.
            Transition(NODE_STATE_TRANSITIONING,
                       Format("role changed from %s to %s", NodeRoleName(old),
                              NodeRoleName(detected)),
                       now);
        } else if (target != state_) {
            role_ = detected;
            Transition(target,
                       target == NODE_STATE_DEGRADED ? degraded_reason
                                                     : "latency and replication lag back below "
                                                       "the degraded thresholds",
                       now);
        } else {
            role_ = detected;
            Publish();
        }
        break;
    default:
        Publish();
        break;
    }
    if (Serving())
        role_before_ = role_; // compared with the role found when it recovers from an outage
}

void Node::MarkUnhealthy(const std::string &reason, TimestampTz now)
{
    // ScheduleRetry closes every connection (a node that failed its checks may hold stuck
    // ones) and fails the waiting callers.
    retry_attempt_ = 0;
    ScheduleRetry(reason, now);
}

long Node::BackoffMs(int attempt) const
{
    long delay = peerpool_reconnect_backoff_initial;
    for (int i = 1; i < attempt && delay < peerpool_reconnect_backoff_max; i++)
        delay *= 2;
    delay = std::min<long>(delay, peerpool_reconnect_backoff_max);
    // Up to 10 % less, so a fleet that failed together does not retry in lockstep.
    double jitter = pg_prng_double(&pg_global_prng_state) * 0.1;
    return std::max<long>(1, static_cast<long>(static_cast<double>(delay) * (1.0 - jitter)));
}

// The node is down: it rests in unhealthy (SPEC section 3) with retry_attempt and
// next_retry_at until Manage starts the next attempt (reconnecting).
void Node::ScheduleRetry(const std::string &reason, TimestampTz now)
{
    CloseAll();
    FailWaiters(ERRCODE_CONNECTION_FAILURE, "node became unhealthy: " + reason, now);
    good_checks_ = 0;
    if (!(on_request_ && retry_attempt_ > 0))
        retry_attempt_++;
    on_request_ = false;
    long delay = BackoffMs(retry_attempt_);
    next_retry_at_ = After(now, delay);
    Transition(NODE_STATE_UNHEALTHY,
               Format("%s; retry %d in %ld ms", reason.c_str(), retry_attempt_, delay), now);
}

void Node::CompleteCheckRequests(bool all)
{
    NodeSlot &slot = Slot();
    uint64 target = all ? pg_atomic_read_u64(&slot.check_requested) : check_request_target_;
    if (target > pg_atomic_read_u64(&slot.check_completed)) {
        Publish(); // the waiter reads node_health right after waking
        pg_atomic_write_u64(&slot.check_completed, target);
        ConditionVariableBroadcast(&State().check_cv); // spinlock + SetLatch: cannot error
    }
}

// ---- events from the loop ------------------------------------------------------------------

void Node::HandleBrokenConnection(Connection *conn, TimestampTz now)
{
    bool never_connected = !conn->ever_connected();
    bool was_check = check_phase_ != CHECK_NONE && check_conn_ == conn->id();
    std::string error = conn->error();
    std::string sqlstate = conn->error_sqlstate();
    LogNotices(conn);
    CloseConnection(conn->id(), false);
    if (state_ == NODE_STATE_DRAINING || state_ == NODE_STATE_DISCONNECTED)
        return;
    if (never_connected) {
        if (Serving() && RefusedForCapacity(error)) {
            // The node answers but has no slot for one more session (its max_connections):
            // running queries and the state stay as they are; callers keep waiting (FIFO), a
            // check waits for a connection of ours to come back.
            growth_blocked_until_ = After(now, kGrowthRetryMs);
            if (was_check) {
                check_starved_ = true;
                check_blocked_until_ = After(now, kGrowthRetryMs);
            }
            Publish();
            return;
        }
        // A connection attempt failed (refused, authentication, timeout): a hard failure when
        // it was the check's, or the node's only way to serve.
        last_sqlstate_ = sqlstate;
        if (was_check ||
            (Serving() && ConnectionCount(CONN_STATE_IDLE) + ConnectionCount(CONN_STATE_BUSY) +
                                  ConnectionCount(CONN_STATE_CHECKING) ==
                              0))
            CheckFailed("could not connect: " + error, sqlstate, true, false, now);
        else if (Serving()) {
            // A growth connection failed while others serve: let a check decide, now.
            growth_blocked_until_ = After(now, kGrowthRetryMs);
            if (check_phase_ == CHECK_NONE)
                next_check_at_ = now;
        }
        return;
    }
    if (was_check && check_reused_) {
        // A pooled session that the peer had already ended (pg_terminate_backend,
        // idle_session_timeout): it says nothing about the node. Look again at once, on
        // another connection or a new one; a dead node then fails to connect (a hard failure).
        next_check_at_ = now;
        return;
    }
    if (was_check) {
        // The check's own connection broke under it: count it, and look again at once.
        CheckFailed("connection lost during health check: " + error, "", false, true, now);
        return;
    }
    // An idle pooled connection broke (RST, EOF, FATAL): look at the node now.
    if (Serving() && check_phase_ == CHECK_NONE)
        next_check_at_ = now;
}

void Node::OnSocketReady(uint64 conn_id, TimestampTz now)
{
    MarkDirty();
    Connection *conn = FindConnection(conn_id);
    if (conn == nullptr)
        return;
    if (conn->state() == CONN_STATE_BUSY) {
        auto lease = leases_.find(conn_id);
        if (lease != leases_.end() && lease->second.owner.valid())
            fleet_.LeaseReady(lease->second.owner, *this, *conn, now);
        else
            DrainOrphan(conn, now);
        return;
    }
    if (check_phase_ == CHECK_RUNNING && check_conn_ == conn_id && check_arrival_ == 0)
        check_arrival_ = conn->PeekArrival(); // before libpq reads it
    ConnState before = conn->state();
    bool changed = conn->OnSocketReady();
    SettleConnecting(conn);
    LogNotices(conn);
    if (!changed)
        return;
    if (conn->state() == CONN_STATE_BROKEN && !conn->query_finished()) {
        HandleBrokenConnection(conn, now);
        return;
    }
    if (before == CONN_STATE_CONNECTING && conn->state() == CONN_STATE_IDLE) {
        pg_atomic_fetch_add_u64(&Slot().created, 1);
        if (check_phase_ == CHECK_CONNECTING && check_conn_ == conn_id)
            RunCheckOn(conn, now);
        else
            GrantWaiting(now);
        return;
    }
    if (jobs_.count(conn_id) != 0 && conn->query_finished()) {
        FinishJob(conn, now);
        return;
    }
    if (check_phase_ == CHECK_RUNNING && check_conn_ == conn_id && conn->query_finished()) {
        QueryOutcome outcome = conn->TakeOutcome();
        check_phase_ = CHECK_NONE;
        bool lost = conn->state() == CONN_STATE_BROKEN && !outcome.ok;
        bool stale_session = lost && check_reused_; // see HandleBrokenConnection
        if (conn->state() == CONN_STATE_BROKEN) {
            // Finished, but the connection is unusable (lost, or left in a transaction).
            CloseConnection(conn_id, false);
        } else if (conn->recycle_requested) {
            CloseConnection(conn_id, true);
        } else if (static_cast<int>(conns_.size()) > config_.max_connections) {
            // The check's extra connection: never handed to a caller, whose cap is
            // max_connections (SPEC section 9: no remote connection count above max).
            CloseConnection(conn_id, false);
        } else {
            GrantWaiting(now);
        }
        if (stale_session) {
            next_check_at_ = now;
            Publish();
            return;
        }
        FinishCheck(outcome, lost, now);
    }
}

void Node::OnResolved(TimestampTz now)
{
    for (const auto &c : conns_) {
        if (!c->resolving() || c->state() != CONN_STATE_CONNECTING)
            continue;
        MarkDirty();
        ConnOptions options = c->unresolved_options();
        std::string error;
        switch (fleet_.resolver().Resolve(options, now, error)) {
        case RESOLVE_PENDING:
            break;
        case RESOLVE_FAILED:
            c->MarkBroken(error); // handled by Manage, like any failed attempt
            break;
        case RESOLVE_READY:
            c->BeginConnect(options);
            break;
        }
    }
}

// ---- the state machine ---------------------------------------------------------------------

void Node::MaintainPool(TimestampTz now)
{
    // Replace connections past max_lifetime between uses.
    if (peerpool_max_lifetime > 0) {
        std::vector<uint64> old;
        for (const auto &c : conns_)
            if (c->state() == CONN_STATE_IDLE &&
                now >= After(c->connected_at(), peerpool_max_lifetime))
                old.push_back(c->id());
        for (uint64 id : old)
            CloseConnection(id, true);
    }
    // Close idle connections above min_connections once idle_timeout passed.
    while (peerpool_idle_timeout > 0 && static_cast<int>(conns_.size()) > config_.min_connections) {
        TimestampTz lru = 0;
        if (!OldestIdle(lru) || now < After(lru, peerpool_idle_timeout))
            break;
        CloseOldestIdle();
    }
    // Keep min_connections warm (never by evicting other nodes' connections).
    while (Serving() && static_cast<int>(conns_.size()) < config_.min_connections) {
        Connection *conn = OpenConnection(now, false);
        if (conn == nullptr)
            break;
        if (conn->state() == CONN_STATE_BROKEN) {
            HandleBrokenConnection(conn, now);
            break;
        }
    }
}

void Node::Manage(TimestampTz now)
{
    // What Manage does to this node itself needs no further pass: it ends with dirty_ cleared
    // and its timers recomputed (see MarkDirty).
    struct Managing {
        bool &flag;
        explicit Managing(bool &f) : flag(f) { flag = true; }
        ~Managing() { flag = false; }
    } managing(managing_);
    if (growth_blocked_until_ != 0 && now >= growth_blocked_until_)
        growth_blocked_until_ = 0; // over: as a timer in the past it would wake the loop at once
    // Connection attempts past connect_timeout.
    for (const auto &c : conns_)
        if (c->state() == CONN_STATE_CONNECTING && now >= c->deadline())
            c->MarkBroken(c->resolving()
                              ? Format("timeout expired after %d ms while resolving the host name",
                                       peerpool_connect_timeout)
                              : Format("timeout expired after %d ms", peerpool_connect_timeout));
    for (;;) {
        auto it = std::find_if(conns_.begin(), conns_.end(), [](const auto &c) {
            return c->state() == CONN_STATE_BROKEN && !c->query_finished();
        });
        if (it == conns_.end())
            break;
        HandleBrokenConnection(it->get(), now);
    }

    // A check past its deadline: its connection is stuck, discard it.
    if (check_phase_ != CHECK_NONE && now >= check_deadline_) {
        CloseConnection(check_conn_, false);
        check_phase_ = CHECK_NONE;
        CheckFailed(Format("health check timed out after %.0f ms", MsBetween(check_started_, now)),
                    "", false, false, now);
    }

    // Cancels that did not reach the node in time: the session they were for is closed (the
    // cancel may still arrive later; it can only hit that session's query).
    for (auto it = cancels_.begin(); it != cancels_.end();) {
        if (now >= it->second.deadline) {
            int pid = it->second.pid;
            fleet_.canceller().Forget(it->first); // still queued: never sent
            it = cancels_.erase(it);
            LogCancelFailure(pid, "no answer within peerpool.connect_timeout + "
                                  "peerpool.health_check_timeout");
            ReleaseHeld(pid, false, now);
            // The query may still run (its orphan grace period can be longer than this
            // deadline): a cancel still on its way must not find the next caller's query.
            for (const auto &c : conns_)
                if (c->backend_pid() == pid) {
                    auto lease = leases_.find(c->id());
                    if (lease != leases_.end() && !lease->second.owner.valid()) {
                        leases_.erase(lease);
                        CloseConnection(c->id(), false);
                    }
                    break;
                }
        } else {
            ++it;
        }
    }
    // Our own queries (cleanup) and cancelled queries past their grace period.
    {
        std::vector<uint64> expired;
        for (const auto &[id, job] : jobs_)
            if (now >= job.deadline)
                expired.push_back(id);
        for (const auto &[id, lease] : leases_)
            if (!lease.owner.valid() && lease.orphan_deadline != 0 && now >= lease.orphan_deadline)
                expired.push_back(id);
        for (uint64 id : expired)
            CloseConnection(id, false);
    }
    // Waiters past their acquire deadline (FIFO order is kept for the others).
    for (auto it = waiters_.begin(); it != waiters_.end();) {
        if (it->deadline != 0 && now >= it->deadline) {
            LeaseOwner owner = it->owner;
            it = waiters_.erase(it);
            pg_atomic_fetch_add_u64(&Slot().acquire_timeouts, 1);
            fleet_.WaitFailed(owner, ERRCODE_TOO_MANY_CONNECTIONS,
                              Format("timeout waiting for a connection of node \"%s\" "
                                     "(max_connections %d, peerpool.acquire_timeout)",
                                     config_.name.c_str(), config_.max_connections),
                              now);
        } else {
            ++it;
        }
    }
    if (Serving())
        GrantWaiting(now);

    bool requested = pg_atomic_read_u64(&Slot().check_requested) >
                     pg_atomic_read_u64(&Slot().check_completed);

    switch (state_) {
    case NODE_STATE_DISCONNECTED:
        if (config_.enabled) {
            Transition(NODE_STATE_CONNECTING,
                       started_ ? "node enabled"
                                : (loaded_at_startup_ ? "pool manager started" : "node registered"),
                       now);
            started_ = true;
            StartCheck(now);
        } else {
            CompleteCheckRequests(true); // nothing to check on a disabled node
        }
        break;
    case NODE_STATE_CONNECTING:
        if (check_phase_ == CHECK_NONE && now >= check_blocked_until_ &&
            (now >= next_check_at_ || requested))
            StartCheck(now);
        break;
    case NODE_STATE_UNHEALTHY:
        // Resting until the retry is due (or pool_check_health() asks): then one attempt.
        if (check_phase_ == CHECK_NONE && now >= check_blocked_until_ &&
            (now >= next_retry_at_ || requested)) {
            // An attempt asked for by pool_check_health() does not advance the backoff.
            on_request_ = now < next_retry_at_;
            Transition(NODE_STATE_RECONNECTING, Format("attempt %d", retry_attempt_), now);
            StartCheck(now);
        }
        break;
    case NODE_STATE_RECONNECTING:
        // An attempt is in flight; after a good check, the next ones until healthy_threshold.
        if (check_phase_ == CHECK_NONE && now >= check_blocked_until_ &&
            (good_checks_ == 0 || now >= next_check_at_ || requested))
            StartCheck(now);
        break;
    case NODE_STATE_HEALTHY:
    case NODE_STATE_DEGRADED:
    case NODE_STATE_TRANSITIONING:
        if (check_phase_ == CHECK_NONE && now >= check_blocked_until_ &&
            (now >= next_check_at_ || requested))
            StartCheck(now);
        if (Serving())
            MaintainPool(now);
        break;
    case NODE_STATE_DRAINING: {
        // Idle connections close as they come back; running callers' queries may finish
        // until drain_timeout, then they are cancelled (and closed once that is done).
        std::vector<uint64> idle;
        for (const auto &c : conns_)
            if (c->state() == CONN_STATE_IDLE && jobs_.count(c->id()) == 0 &&
                held_for_cancel_.count(c->id()) == 0)
                idle.push_back(c->id());
        for (uint64 id : idle)
            CloseConnection(id, false);
        if (drain_deadline_ != 0 && now >= drain_deadline_) {
            drain_deadline_ = 0; // done once; orphans then close on their own deadlines
            std::vector<std::pair<uint64, LeaseOwner>> running;
            for (const auto &[id, lease] : leases_)
                if (lease.owner.valid())
                    running.emplace_back(id, lease.owner);
            for (const auto &[id, owner] : running) {
                AbortLease(id, now);
                fleet_.LeaseLost(owner, "node removed; drain_timeout expired", now);
            }
        }
        CompleteCheckRequests(true);
        break;
    }
    }
    if (waiters_.empty())
        fleet_.BudgetWaitEnded(this);
    Publish();
    dirty_ = false;
    cached_wake_ = NextWake();
    fleet_.NodeManaged(this, cached_wake_, !waiters_.empty());
}

bool Node::Due(TimestampTz now) const
{
    if (dirty_ || !waiters_.empty())
        return true;
    if (cached_wake_ != 0 && now >= cached_wake_)
        return true;
    return CheckRequested(); // pool_check_health() (it also sets our latch)
}

TimestampTz Node::NextWake() const
{
    TimestampTz wake = 0;
    auto consider = [&](TimestampTz t) {
        if (t != 0 && (wake == 0 || t < wake))
            wake = t;
    };
    for (const auto &c : conns_) {
        if (c->state() == CONN_STATE_CONNECTING)
            consider(c->deadline());
        if (c->state() == CONN_STATE_IDLE && Serving()) { // MaintainPool runs only then
            if (peerpool_max_lifetime > 0)
                consider(After(c->connected_at(), peerpool_max_lifetime));
            if (peerpool_idle_timeout > 0 &&
                static_cast<int>(conns_.size()) > config_.min_connections)
                consider(After(c->last_used(), peerpool_idle_timeout));
        }
    }
    if (check_phase_ != CHECK_NONE)
        consider(check_deadline_);
    else if (Serving() || state_ == NODE_STATE_CONNECTING)
        consider(std::max(next_check_at_, check_blocked_until_));
    else if (state_ == NODE_STATE_RECONNECTING)
        consider(std::max(good_checks_ > 0 ? next_check_at_ : 0, check_blocked_until_));
    else if (state_ == NODE_STATE_UNHEALTHY)
        consider(std::max(next_retry_at_, check_blocked_until_));
    if (state_ == NODE_STATE_DRAINING)
        consider(drain_deadline_);
    for (const Waiter &w : waiters_)
        consider(w.deadline);
    if (!waiters_.empty() && growth_blocked_until_ != 0)
        consider(growth_blocked_until_); // then GrantWaiting may open connections again
    for (const auto &[id, job] : jobs_)
        consider(job.deadline);
    for (const auto &[token, cancel] : cancels_)
        consider(cancel.deadline);
    for (const auto &[id, lease] : leases_)
        if (!lease.owner.valid())
            consider(lease.orphan_deadline);
    return wake;
}

void Node::CollectSockets(std::vector<SocketInterest> &out) const
{
    for (const auto &c : conns_) {
        pgsocket sock;
        uint32 events = c->WaitEvents(sock);
        if (events != 0)
            out.push_back({c->id(), sock, events, c->socket_epoch()});
    }
}

void Node::Publish() const
{
    NodeSlot &slot = Slot();
    Published now{state_,
                  role_,
                  state_since_,
                  last_check_,
                  last_success_,
                  state_ == NODE_STATE_UNHEALTHY ? next_retry_at_ : 0,
                  consecutive_failures_,
                  retry_attempt_,
                  latency_ms_,
                  lag_ms_,
                  last_error_,
                  last_sqlstate_};
    if (!ever_published_ || !(now == published_)) {
        // Cannot error: the only LWLock held, and only plain stores under it.
        LWLockAcquire(State().lock, LW_EXCLUSIVE);
        slot.state = now.state;
        slot.detected_role = now.role;
        slot.state_since = now.state_since;
        slot.last_check = now.last_check;
        slot.last_success = now.last_success;
        slot.consecutive_failures = now.consecutive_failures;
        CopyClipped(slot.last_error, sizeof(slot.last_error), now.last_error);
        strlcpy(slot.last_sqlstate, now.last_sqlstate.c_str(), sizeof(slot.last_sqlstate));
        slot.latency_ms = now.latency_ms;
        slot.replication_lag_ms = now.lag_ms;
        slot.retry_attempt = now.retry_attempt;
        slot.next_retry_at = now.next_retry_at;
        LWLockRelease(State().lock);
        published_ = std::move(now);
        ever_published_ = true;
    }

    int active = ConnectionCount(CONN_STATE_CHECKING) + ConnectionCount(CONN_STATE_BUSY);
    pg_atomic_write_u32(&slot.waiting, static_cast<uint32>(waiters_.size()));
    int idle = ConnectionCount(CONN_STATE_IDLE);
    pg_atomic_write_u32(&slot.total, static_cast<uint32>(conns_.size()));
    pg_atomic_write_u32(&slot.active, static_cast<uint32>(active));
    pg_atomic_write_u32(&slot.idle, static_cast<uint32>(idle));
}

// ---- leases ---------------------------------------------------------------------------------

int Node::busy_connections() const
{
    return ConnectionCount(CONN_STATE_BUSY) + ConnectionCount(CONN_STATE_CHECKING);
}

void Node::Enqueue(const LeaseOwner &owner, TimestampTz acquire_deadline, TimestampTz now)
{
    MarkDirty();
    waiters_.push_back({owner, acquire_deadline, now});
    GrantWaiting(now);
    Publish();
}

void Node::CancelWait(const LeaseOwner &owner)
{
    MarkDirty();
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it)
        if (it->owner == owner) {
            waiters_.erase(it);
            return;
        }
}

void Node::FailWaiters(int sqlerrcode, const std::string &why, TimestampTz now)
{
    std::deque<Waiter> failed;
    failed.swap(waiters_);
    for (const Waiter &w : failed)
        fleet_.WaitFailed(w.owner, sqlerrcode,
                          Format("node \"%s\": %s", config_.name.c_str(), why.c_str()), now);
}

Connection *Node::LeasedConnection(uint64 conn_id) const
{
    auto it = leases_.find(conn_id);
    if (it == leases_.end() || !it->second.owner.valid())
        return nullptr;
    return FindConnection(conn_id);
}

// Hands idle connections to waiters in FIFO order; opens connections (up to max_connections,
// evicting other nodes' idle ones when the fleet budget is spent) for the rest.
void Node::GrantWaiting(TimestampTz now)
{
    if (!Serving())
        return;
    if (check_starved_ && check_phase_ == CHECK_NONE && IdleConnection() != nullptr)
        StartCheck(now); // a due check goes first; it is short
    if (!Serving())
        return;
    while (!waiters_.empty()) {
        Connection *idle = LiveIdleConnection(now);
        if (idle == nullptr || !Serving())
            break;
        if (fleet_.YieldBudget(this, waiters_.front().since, now)) {
            // Another node's caller has waited longer for the fleet budget: the unit goes to
            // that node; ours wait their turn.
            CloseConnection(idle->id(), false);
            continue;
        }
        Waiter w = waiters_.front();
        waiters_.pop_front();
        leases_[idle->id()] = {w.owner, now, 0};
        if (!fleet_.Grant(w.owner, *this, *idle, now)) {
            leases_.erase(idle->id());
            if (idle->state() == CONN_STATE_BUSY)
                AbortLease(idle->id(), now);
            continue;
        }
        pg_atomic_fetch_add_u64(&Slot().acquires, 1);
        if (idle->state() == CONN_STATE_BROKEN) {
            HandleBrokenConnection(idle, now);
        }
    }
    int connecting = ConnectionCount(CONN_STATE_CONNECTING);
    while (static_cast<int>(waiters_.size()) > connecting &&
           static_cast<int>(conns_.size()) < config_.max_connections &&
           now >= growth_blocked_until_) {
        Connection *conn = OpenConnection(now, true, waiters_[connecting].since);
        if (conn == nullptr)
            break;
        if (conn->state() == CONN_STATE_BROKEN) {
            HandleBrokenConnection(conn, now);
            break;
        }
        connecting++;
    }
    if (static_cast<int>(conns_.size()) >= config_.max_connections)
        fleet_.BudgetWaitEnded(this); // our callers wait for our own cap, not for the budget
}

void Node::ReleaseLease(uint64 conn_id, bool ok, TimestampTz now)
{
    MarkDirty();
    auto it = leases_.find(conn_id);
    if (it == leases_.end())
        return;
    double ms = MsBetween(it->second.started, now);
    leases_.erase(it);
    pg_atomic_fetch_add_u64(&Slot().queries, 1);
    pg_atomic_fetch_add_u64(&Slot().query_time_us, static_cast<uint64>(ms * 1000));
    if (!ok)
        pg_atomic_fetch_add_u64(&Slot().errors, 1);
    Connection *conn = FindConnection(conn_id);
    if (conn == nullptr)
        return;
    LogNotices(conn); // what the caller's query raised, bounded (Connection::NoticeReceiver)
    if (conn->state() == CONN_STATE_BROKEN) {
        HandleBrokenConnection(conn, now);
        return;
    }
    ReturnToPool(conn, now);
}

// A connection whose caller is done: roll back what it left open, run reset_query, pool it.
void Node::ReturnToPool(Connection *conn, TimestampTz now)
{
    bool dirty = conn->transaction_status() != PQTRANS_IDLE;
    bool reset = peerpool_reset_query != nullptr && peerpool_reset_query[0] != '\0';
    if (state_ == NODE_STATE_DRAINING || state_ == NODE_STATE_DISCONNECTED ||
        conn->recycle_requested) {
        CloseConnection(conn->id(), conn->recycle_requested);
        return;
    }
    if (AboveMax()) {
        // max_connections was lowered while this connection was busy: close it rather than
        // hand it on, so the new cap holds as soon as calls return (not one check at a time).
        CloseConnection(conn->id(), false);
        return;
    }
    if (dirty || reset) {
        StartCleanup(conn, now);
        return;
    }
    conn->MarkIdle(now);
    GrantWaiting(now);
}

// More connections than max_connections allows, not counting the short-lived extra (the
// connection of a running check, which may be one opened beyond max_connections): true after
// max_connections was lowered under load.
bool Node::AboveMax() const
{
    int extras = check_phase_ != CHECK_NONE ? 1 : 0;
    return static_cast<int>(conns_.size()) > config_.max_connections + extras;
}

void Node::StartCleanup(Connection *conn, TimestampTz now)
{
    conn->MarkIdle(now);
    if (conn->transaction_status() != PQTRANS_IDLE)
        StartJob(conn, JOB_ROLLBACK, "ROLLBACK", now);
    else
        StartJob(conn, JOB_RESET, peerpool_reset_query, now);
}

bool Node::StartJob(Connection *conn, JobKind kind, const std::string &sql, TimestampTz now)
{
    jobs_[conn->id()] = {kind, After(now, peerpool_health_check_timeout)};
    if (conn->SendQuery(sql, now, jobs_[conn->id()].deadline))
        return true;
    HandleBrokenConnection(conn, now);
    return false;
}

void Node::AbortLease(uint64 conn_id, TimestampTz now)
{
    MarkDirty();
    auto it = leases_.find(conn_id);
    Connection *conn = FindConnection(conn_id);
    if (it == leases_.end() || conn == nullptr)
        return;
    double ms = MsBetween(it->second.started, now);
    pg_atomic_fetch_add_u64(&Slot().queries, 1);
    pg_atomic_fetch_add_u64(&Slot().errors, 1);
    pg_atomic_fetch_add_u64(&Slot().query_time_us, static_cast<uint64>(ms * 1000));
    // The connection stays busy, its results discarded, until the cancelled query returns;
    // then it is cleaned and pooled. If it does not return in time it is closed.
    it->second.owner = LeaseOwner();
    it->second.orphan_deadline = After(now, static_cast<int64>(peerpool_connect_timeout) + 1000);
    if (conn->state() != CONN_STATE_BUSY) {
        leases_.erase(it);
        ReturnToPool(conn, now);
        return;
    }
    if (!StartCancel(conn, now)) {
        // No cancel can be sent: the session is closed, which ends the query as soon as the
        // node notices.
        leases_.erase(it);
        CloseConnection(conn->id(), false);
        return;
    }
    DrainOrphan(conn, now);
}

void Node::DiscardLease(uint64 conn_id)
{
    MarkDirty();
    auto it = leases_.find(conn_id);
    if (it != leases_.end()) {
        pg_atomic_fetch_add_u64(&Slot().queries, 1);
        pg_atomic_fetch_add_u64(&Slot().errors, 1);
        leases_.erase(it);
    }
    CloseConnection(conn_id, false);
}

// Cancels the session's running query with the protocol's CancelRequest (PQcancel on a
// helper thread, canceller.hpp): needs no free connection slot, no privilege on the node, and
// reaches the right server process behind a pooler. Returns false if none can be sent.
bool Node::StartCancel(Connection *conn, TimestampTz now)
{
    int pid = conn->backend_pid();
    uint64 token = fleet_.canceller().Start(config_.name, conn->GetCancel());
    if (token == 0) {
        LogCancelFailure(pid, "could not prepare the cancel request");
        return false;
    }
    cancels_[token] = {pid, After(now, static_cast<int64>(peerpool_connect_timeout) +
                                           peerpool_health_check_timeout)};
    return true;
}

void Node::CancelDone(uint64 token, bool ok, const std::string &error, TimestampTz now)
{
    auto it = cancels_.find(token);
    if (it == cancels_.end())
        return; // given up already (deadline), or the node was replaced
    int pid = it->second.pid;
    cancels_.erase(it);
    MarkDirty();
    if (!ok)
        LogCancelFailure(pid, error);
    // A cancel that failed may still be delivered later: never hand that session on.
    ReleaseHeld(pid, ok, now);
}

void Node::LogCancelFailure(int pid, const std::string &why) const
{
    pg::Call([&] {
        ereport(LOG, (errmsg_internal("pg_peerpool: node \"%s\": could not cancel the query of "
                                      "remote backend %d: %s",
                                      config_.name.c_str(), pid, why.c_str())));
    });
}

void Node::FinishJob(Connection *conn, TimestampTz now)
{
    auto it = jobs_.find(conn->id());
    Job job = it->second;
    jobs_.erase(it);
    QueryOutcome outcome = conn->TakeOutcome();
    if (!outcome.ok || conn->state() == CONN_STATE_BROKEN) {
        // A connection we cannot clean is never handed to the next caller.
        std::string why = outcome.ok ? conn->error() : outcome.error;
        pg::Call([&] {
            ereport(LOG,
                    (errmsg_internal("pg_peerpool: node \"%s\": discarding a "
                                     "connection: %s failed: %s",
                                     config_.name.c_str(),
                                     job.kind == JOB_ROLLBACK ? "ROLLBACK" : "peerpool.reset_query",
                                     why.c_str())));
        });
        CloseConnection(conn->id(), false);
        return;
    }
    if (job.kind == JOB_ROLLBACK && peerpool_reset_query != nullptr &&
        peerpool_reset_query[0] != '\0') {
        StartJob(conn, JOB_RESET, peerpool_reset_query, now);
        return;
    }
    conn->MarkIdle(now); // clean: straight back to the pool (no second cleanup round)
    if (state_ == NODE_STATE_DRAINING || conn->recycle_requested)
        CloseConnection(conn->id(), conn->recycle_requested);
    else if (AboveMax()) // max_connections lowered during the cleanup
        CloseConnection(conn->id(), false);
    else
        GrantWaiting(now);
}

bool Node::CancelInFlight(int pid) const
{
    for (const auto &[token, cancel] : cancels_)
        if (cancel.pid == pid)
            return true;
    return false;
}

void Node::ReleaseHeld(int pid, bool pool, TimestampTz now)
{
    if (CancelInFlight(pid))
        return; // another cancel for the same session is still on its way
    for (auto it = held_for_cancel_.begin(); it != held_for_cancel_.end(); ++it)
        if (it->second == pid) {
            uint64 id = it->first;
            held_for_cancel_.erase(it);
            if (Connection *conn = FindConnection(id)) {
                if (pool)
                    ReturnToPool(conn, now);
                else
                    CloseConnection(id, false);
            }
            return;
        }
}

// Reads and drops the results of a cancelled query; pools the connection once it is done.
void Node::DrainOrphan(Connection *conn, TimestampTz now)
{
    // A query that entered COPY never ends by reading results: stop and close the connection.
    PumpStatus status = conn->Pump(
        [](PGresult *res) {
            ExecStatusType st = PQresultStatus(res);
            PQclear(res);
            return st != PGRES_COPY_IN && st != PGRES_COPY_OUT && st != PGRES_COPY_BOTH;
        },
        true);
    if (status == PUMP_PAUSED) {
        leases_.erase(conn->id());
        CloseConnection(conn->id(), false);
        return;
    }
    if (status != PUMP_DONE)
        return;
    leases_.erase(conn->id());
    if (conn->state() == CONN_STATE_BROKEN) {
        HandleBrokenConnection(conn, now);
        return;
    }
    int pid = conn->backend_pid();
    if (CancelInFlight(pid)) {
        held_for_cancel_[conn->id()] = pid; // pooled once the cancel has run
        return;
    }
    ReturnToPool(conn, now);
}

} // namespace peerpool
