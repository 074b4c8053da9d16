// One peer node: its connection pool and its health state machine (SPEC sections 3 and 7).
//
// States (NodeState) and why a node moves between them:
//   disconnected --enabled--> connecting --first good check--> healthy | degraded
//   connecting --connect/check failed--> unhealthy (rests there until the retry is due)
//   healthy/degraded/transitioning --hard connection failure, or unhealthy_threshold
//       consecutive failed checks--> unhealthy
//   unhealthy --retry due (backoff 1 s, 2 s, 4 s ... cap), or pool_check_health()--> reconnecting
//   reconnecting --attempt failed--> unhealthy (next retry, doubled delay)
//   reconnecting --healthy_threshold good checks--> healthy | degraded
//   healthy <--> degraded (smoothed latency / replay lag against the degraded thresholds)
//   healthy/degraded --detected role changed--> transitioning --next check confirms--> healthy
//   any --removed--> draining --> (slot freed);  any --disabled--> disconnected
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pg_peerpool/pool/connection.hpp"
#include "pg_peerpool/pool/events.hpp"
#include "pg_peerpool/pool/node_config.hpp"
#include "pg_peerpool/pool/canceller.hpp"
#include "pg_peerpool/pool/resolver.hpp"
#include "pg_peerpool/shmem.hpp"

namespace peerpool {

class Node;

// Who holds (or waits for) a connection: one task of one caller's request.
struct LeaseOwner {
    uint64 request_key = 0; // 0 = nobody
    int task = -1;
    bool valid() const { return request_key != 0; }
    bool operator==(const LeaseOwner &o) const
    {
        return request_key == o.request_key && task == o.task;
    }
};

// What a node needs from the pool manager that owns every node.
class Fleet {
public:
    // A waiting task gets `conn` (idle). Returns false if the task no longer wants it.
    virtual bool Grant(const LeaseOwner &owner, Node &node, Connection &conn, TimestampTz now) = 0;
    // The task's connection has results to read.
    virtual void LeaseReady(const LeaseOwner &owner, Node &node, Connection &conn,
                            TimestampTz now) = 0;
    // The task's connection is gone (broken, node unhealthy or removed).
    virtual void LeaseLost(const LeaseOwner &owner, const std::string &error, TimestampTz now) = 0;
    // The task waited in vain (acquire timeout, node unhealthy or removed).
    virtual void WaitFailed(const LeaseOwner &owner, int sqlerrcode, const std::string &error,
                            TimestampTz now) = 0;
    virtual ~Fleet() = default;
    // Takes one connection from the fleet budget (max_total_connections and the process's
    // external FD allowance). With `evict`, may close another node's least recently used idle
    // connection to make room. Returns false when no room could be made; then, if
    // `waiter_since` is set (the connection is for a caller who has waited since then), the
    // requester is queued for the budget in that caller's turn (see YieldBudget).
    virtual bool ReserveConnection(Node *requester, bool evict, TimestampTz waiter_since = 0) = 0;
    // The fleet budget is shared fairly across nodes (SPEC section 7): true if `node`, about to
    // hand an idle connection to a caller waiting since `since`, should close it instead,
    // because a node holding at least two connections fewer has a caller who has waited
    // longer for the budget. The unit freed is then held for that node until it opens its
    // connection (or for 1 s). Nodes thus converge to equal shares, and stop trading units
    // once within one of each other.
    virtual bool YieldBudget(const Node *node, TimestampTz since, TimestampTz now) = 0;
    // `node` waits for the budget no more (no waiting caller, or removed).
    virtual void BudgetWaitEnded(const Node *node) = 0;
    virtual void ReleaseConnection() = 0;
    virtual uint64 NextConnectionId() = 0;
    virtual EventLog &events() = 0;
    virtual Resolver &resolver() = 0;
    virtual Canceller &canceller() = 0;
    // Connection attempts in flight across the fleet are capped (kMaxConnecting), so that
    // 1,000 nodes starting together do not storm their peers into timeouts.
    virtual bool MayStartConnecting() const = 0;
    // Our own connection storm: at least 8 connection attempts in flight (a start
    // or a mass registration of a large fleet). Check latencies then measure our load.
    virtual bool ConnectionStorm() const = 0;
    virtual void ConnectingChanged(int delta) = 0;
    // The loop's bookkeeping, so that a wake-up costs what changed, not the size of the fleet:
    // `node` must be managed on the next pass, and the loop must not sleep before (MarkDirty);
    virtual void NodeDirty(Node *node) = 0;
    // what its connections wait for on their sockets may have changed;
    virtual void NodeSocketsChanged(Node *node) = 0;
    // it was managed: its next timer, and whether callers wait (managed on every pass then);
    virtual void NodeManaged(Node *node, TimestampTz wake, bool has_waiters) = 0;
    // it is being destroyed: forget every pointer to it.
    virtual void NodeGone(Node *node) = 0;
};

class Node final : public InterestListener {
public:
    // `slot` is the node's index in SharedState::nodes, claimed by MirrorRegistry.
    // at_startup: loaded when the pool manager (re)started, not newly registered.
    Node(Fleet &fleet, NodeConfig config, int slot, TimestampTz now, bool at_startup = false);
    ~Node();

    const std::string &name() const { return config_.name; }
    NodeState state() const { return state_; }
    const NodeConfig &config() const { return config_; }
    // The configured role, or the detected one when configured as auto.
    NodeRole EffectiveRole() const { return config_.role == NODE_ROLE_AUTO ? role_ : config_.role; }
    double latency_ms() const { return latency_ms_; }
    // Not in recovery, but new sessions are read-only (default_transaction_read_only = on at
    // the last good check): serves reads, routed no writes.
    bool read_only() const { return read_only_; }
    const std::string &last_error() const { return last_error_; }
    int busy_connections() const;
    int connection_count() const { return static_cast<int>(conns_.size()); }

    // ---- leases: callers' queries (FIFO waiting up to the acquire deadline) ----
    void Enqueue(const LeaseOwner &owner, TimestampTz acquire_deadline, TimestampTz now);
    void CancelWait(const LeaseOwner &owner);
    Connection *LeasedConnection(uint64 conn_id) const;
    // The query finished and its results were read: clean the connection and pool it.
    void ReleaseLease(uint64 conn_id, bool ok, TimestampTz now);
    // The caller gave up mid-query (timeout, cancel): cancel it on the node, without waiting.
    void AbortLease(uint64 conn_id, TimestampTz now);
    // A cancel is on its way (shutdown waits for these, bounded).
    bool HasPendingCancels() const { return !cancels_.empty(); }
    // A cancel sent by fleet_.canceller() finished (ok: the node received it).
    void CancelDone(uint64 token, bool ok, const std::string &error, TimestampTz now);
    // The leased connection is unusable (e.g. left in COPY): close it, telling nobody.
    void DiscardLease(uint64 conn_id);

    void Reconfigure(const NodeConfig &config, TimestampTz now);
    void StartDraining(TimestampTz now);
    bool Drained() const { return state_ == NODE_STATE_DRAINING && conns_.empty(); }
    // Closes every connection at once (shutdown).
    void CloseAll();

    // The state machine: timers, checks, pool upkeep. Called after every wake.
    void Manage(TimestampTz now);
    // A socket of ours fired.
    void OnSocketReady(uint64 conn_id, TimestampTz now);
    // Name lookups finished: connections that waited for them start (or fail).
    void OnResolved(TimestampTz now);
    // Earliest time Manage must run again (0: nothing scheduled).
    TimestampTz NextWake() const;
    TimestampTz NextCheckTime(TimestampTz now) const;
    // Whether Manage has anything to do now: something happened to the node since it last ran
    // (every public mutator marks it), a timer is due, or work waits (callers, cancels, a
    // pool_check_health() request). With 1,000 nodes the loop manages only these.
    bool Due(TimestampTz now) const;
    void Touch() { MarkDirty(); }
    // A connection's socket interest changed (Connection::Reconsider), or a connection came or
    // went: tell the loop once until it has looked (loop.sockets_changed).
    void InterestChanged() override;
    // Whether pool_check_health() asked for a check that has not run yet (shared memory).
    bool CheckRequested() const;

    // Owned by the pool manager's loop (PoolManager), kept here so that its lists need no
    // lookups: see Fleet::NodeDirty and the following.
    struct LoopState {
        bool in_dirty_list = false;
        bool sockets_changed = false;
        bool has_waiters = false;
        TimestampTz scheduled_wake = 0; // its entry in the loop's timer queue (0: none)
        uint64 timer_seq = 0;           // ... which is the entry with this number
        uint64 queued_pass = 0;         // the last pass that queued it for Manage
        size_t wait_begin = 0;          // its sockets' entries in the wait set
        size_t wait_count = 0;
    } loop;

    struct SocketInterest {
        uint64 conn_id;
        pgsocket socket;
        uint32 events;
        uint32 epoch; // Connection::socket_epoch()
    };
    void CollectSockets(std::vector<SocketInterest> &out) const;

    // For the fleet budget: the last use of this node's least recently used idle connection
    // (false if none), and closing it.
    bool OldestIdle(TimestampTz &lru) const;
    bool CloseOldestIdle();

    // Publishes health fields and pool gauges to the node's shared-memory slot.
    void Publish() const;

private:
    enum CheckPhase { CHECK_NONE, CHECK_CONNECTING, CHECK_RUNNING };

    struct Waiter {
        LeaseOwner owner;
        TimestampTz deadline;
        TimestampTz since;
    };
    // Our own short queries on a connection other than the health check.
    // JOB_ROLLBACK and JOB_RESET run one after the other: DISCARD ALL and friends refuse to
    // run inside the implicit transaction of a multi-statement string.
    enum JobKind { JOB_ROLLBACK, JOB_RESET };
    struct Job {
        JobKind kind;
        TimestampTz deadline;
    };
    // A CancelRequest on its way (canceller.hpp), for the session with backend `pid`.
    struct CancelSent {
        int pid;
        TimestampTz deadline; // given up after this: the session is closed instead
    };
    struct Lease {
        LeaseOwner owner; // invalid once the caller gave up (orphan: results discarded)
        TimestampTz started;
        TimestampTz orphan_deadline;
    };

    void GrantWaiting(TimestampTz now);
    void FailWaiters(int sqlerrcode, const std::string &why, TimestampTz now);
    bool StartCancel(Connection *conn, TimestampTz now);
    void LogCancelFailure(int pid, const std::string &why) const;
    void StartCleanup(Connection *conn, TimestampTz now);
    bool StartJob(Connection *conn, JobKind kind, const std::string &sql, TimestampTz now);
    bool CancelInFlight(int pid) const;
    // The cancel for `pid` is done: its held connection rejoins the pool (or closes, !pool).
    void ReleaseHeld(int pid, bool pool, TimestampTz now);
    void FinishJob(Connection *conn, TimestampTz now);
    void ReturnToPool(Connection *conn, TimestampTz now);
    bool AboveMax() const;
    void DrainOrphan(Connection *conn, TimestampTz now);

    bool Serving() const;
    void Transition(NodeState to, const std::string &reason, TimestampTz now);
    // waiter_since: the connection is for a caller waiting since then (see ReserveConnection).
    Connection *OpenConnection(TimestampTz now, bool for_check, TimestampTz waiter_since = 0);
    void CloseConnection(uint64 id, bool recycled);
    void SettleConnecting(Connection *conn);
    Connection *FindConnection(uint64 id) const;
    Connection *IdleConnection() const;
    Connection *LiveIdleConnection(TimestampTz now, bool read_socket = true);
    int ConnectionCount(ConnState state) const;

    void StartCheck(TimestampTz now);
    void RunCheckOn(Connection *conn, TimestampTz now);
    void FinishCheck(const QueryOutcome &outcome, bool connection_lost, TimestampTz now);
    // hard: a connection attempt failed (unhealthy at once). recheck_now: look again without
    // waiting for the interval (the failure was a lost connection, not a slow node).
    void CheckFailed(const std::string &error, const std::string &sqlstate, bool hard,
                     bool recheck_now, TimestampTz now);
    void CheckSucceeded(bool in_recovery, double lag_ms, double latency_ms, TimestampTz now);
    void MarkUnhealthy(const std::string &reason, TimestampTz now);
    void ScheduleRetry(const std::string &reason, TimestampTz now);
    // Wakes pool_check_health() callers: those the finished check served, or (all) every one.
    void CompleteCheckRequests(bool all);
    NodeSlot &Slot() const;
    void MaintainPool(TimestampTz now);
    void HandleBrokenConnection(Connection *conn, TimestampTz now);
    void LogNotices(Connection *conn);
    long BackoffMs(int attempt) const;

    Fleet &fleet_;
    NodeConfig config_;
    int slot_;
    bool started_ = false; // has left disconnected at least once
    bool loaded_at_startup_ = false;
    bool on_request_ = false; // the attempt in flight was asked for by pool_check_health()
    std::vector<std::unique_ptr<Connection>> conns_;

    NodeState state_ = NODE_STATE_DISCONNECTED;
    NodeRole role_ = NODE_ROLE_UNKNOWN;
    NodeRole role_before_ = NODE_ROLE_UNKNOWN; // role_ at its last good check while serving
    bool read_only_ = false;                   // see read_only()
    TimestampTz state_since_;
    uint64 phase_seed_; // spreads this node's checks over the interval (NextCheckTime)

    // Health check in flight.
    CheckPhase check_phase_ = CHECK_NONE;
    uint64 check_conn_ = 0;
    TimestampTz check_started_ = 0;
    TimestampTz check_sent_ = 0;    // when its query went out (a fresh clock read)
    TimestampTz check_arrival_ = 0; // when its answer reached this host (PeekArrival), or 0
    TimestampTz check_deadline_ = 0;
    TimestampTz next_check_at_ = 0;
    uint64 check_request_target_ = 0; // pool_check_health number being served

    int consecutive_failures_ = 0;
    int good_checks_ = 0;
    int retry_attempt_ = 0;
    TimestampTz next_retry_at_ = 0;
    TimestampTz drain_deadline_ = 0;

    TimestampTz last_check_ = 0;
    TimestampTz last_success_ = 0;
    std::string last_error_;
    std::string last_sqlstate_;
    double latency_ms_ = -1;
    bool latency_cold_ = false; // latency_ms_ comes from a check on a new connection only
    double lag_ms_ = -1;

    // What Publish() last wrote, so an unchanged node costs no exclusive lock per wake.
    struct Published {
        NodeState state;
        NodeRole role;
        TimestampTz state_since, last_check, last_success, next_retry_at;
        int consecutive_failures, retry_attempt;
        double latency_ms, lag_ms;
        std::string last_error, last_sqlstate;
        bool operator==(const Published &o) const
        {
            return state == o.state && role == o.role && state_since == o.state_since &&
                   last_check == o.last_check && last_success == o.last_success &&
                   next_retry_at == o.next_retry_at &&
                   consecutive_failures == o.consecutive_failures &&
                   retry_attempt == o.retry_attempt && latency_ms == o.latency_ms &&
                   lag_ms == o.lag_ms && last_error == o.last_error &&
                   last_sqlstate == o.last_sqlstate;
        }
    };
    mutable Published published_{};
    mutable bool ever_published_ = false;

    std::deque<Waiter> waiters_;
    std::map<uint64, Lease> leases_;       // conn id -> lease (connections in CONN_STATE_BUSY)
    std::map<uint64, Job> jobs_;           // conn id -> our own query in flight
    std::map<uint64, CancelSent> cancels_; // canceller token -> cancel in flight
    // Connections whose cancelled query ended before the cancel was delivered: held out of the
    // pool until the cancel has run, so it cannot hit the next caller's query. conn id -> pid.
    std::map<uint64, int> held_for_cancel_;
    void MarkDirty();
    bool dirty_ = true;                   // see Due()
    bool managing_ = false;               // inside Manage
    TimestampTz cached_wake_ = 0;         // NextWake() at the end of the last Manage
    bool check_reused_ = false;           // the running check uses a pooled session, not its own
    bool check_in_storm_ = false;         // ... and was sent during our own connection storm
    int storm_samples_ = 0;               // storm samples set aside in a row
    bool check_starved_ = false;          // a check is due but a local limit left it no connection
    TimestampTz check_blocked_until_ = 0; // ... so no new check before this
    TimestampTz full_since_ =
        0; // a due check first found max_connections connections busy (0: not)
    TimestampTz growth_blocked_until_ = 0; // a growth connection was refused: not before this
};

} // namespace peerpool
