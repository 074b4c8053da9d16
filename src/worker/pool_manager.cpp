// The pool manager background worker: registration, signals, and the event loop.
//
// One WaitEventSet over the latch, postmaster death and every libpq socket of every node; it is
// rebuilt when the set of sockets (or what we wait for on them) changes. Each wake: apply
// registry changes, feed ready sockets to their nodes, run every node's state machine, send
// queued NOTIFYs, and sleep until the earliest deadline any node keeps. Nothing blocks on one
// node. Committing backends bump SharedState::registry_generation and set our latch, so a
// registry change applies on the next wake; a slow safety-net recheck (kRecheckMs) catches what
// no trigger reports, such as DROP EXTENSION.
#include "pg_peerpool/worker/pool_manager.hpp"

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <set>

#include <sys/resource.h>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/events.hpp"
#include "pg_peerpool/pool/node.hpp"
#include "pg_peerpool/shmem.hpp"
#include "pg_peerpool/worker/heartbeat.hpp"
#include "pg_peerpool/worker/registry_sync.hpp"
#include "pg_peerpool/worker/request.hpp"

extern "C" {
#include "postgres.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
}

namespace peerpool {

namespace {

constexpr long kRecheckMs = 10000;        // safety-net registry recheck
constexpr long kRetryAfterErrorMs = 1000; // after a failed registry load
constexpr long kMaxSleepMs = 60000;
constexpr rlim_t kMaxDescriptors = 65536; // how far we raise our soft RLIMIT_NOFILE at most
constexpr int kMaxConnecting = 64;        // connection attempts in flight, fleet-wide
constexpr int kStormConnecting = 8;       // attempts in flight that make a connection storm
constexpr long kBudgetHoldMs = 1000;      // a budget unit freed for a node waits this long for it
// How often the loop walks the whole fleet anyway, to verify its bookkeeping (ManageDueNodes,
// RebuildWaitSetIfNeeded): a node or socket it missed is logged and served then.
constexpr long kVerifyMs = 1000;
// The longest the loop may wait for a lock in its own transactions (see Run).
constexpr const char *kLockTimeout = "10ms";

// Set by our SIGTERM handler. We do not use die(): a graceful stop must let the loop close
// its connections (SPEC section 7) instead of exiting from inside CHECK_FOR_INTERRUPTS.
volatile sig_atomic_t shutdown_requested = false;

void HandleSigterm([[maybe_unused]] SIGNAL_ARGS)
{
    int save_errno = errno;
    shutdown_requested = true;
    SetLatch(MyLatch);
    errno = save_errno;
}

// pg_cancel_backend() of the pool manager: there is no statement of ours to cancel, and
// acting on it would raise an ERROR that ends every pool. SIGINT keeps PostgreSQL's handler,
// because lock_timeout itself is delivered as SIGINT and must interrupt our own short
// transactions; outside them the loop takes the request off the books and logs it
// (AbsorbCancel). PostgreSQL-style code: runs inside pg::Call.
bool cancel_requested = false;

void AbsorbCancel()
{
    if (QueryCancelPending) {
        QueryCancelPending = false;
        cancel_requested = true;
    }
}

// CHECK_FOR_INTERRUPTS for the loop: dies on SIGTERM-by-postmaster and the like, never on a
// cancel request (held off, then absorbed).
void CheckLoopInterrupts()
{
    HOLD_CANCEL_INTERRUPTS();
    CHECK_FOR_INTERRUPTS();
    RESUME_CANCEL_INTERRUPTS();
    AbsorbCancel();
}

// before_shmem_exit: stop backends from setting a latch that is about to be reused.
void ForgetWorker(int, Datum)
{
    SharedState *state = Shared();
    if (state != nullptr && MyProc != nullptr) {
        uint32 mine = static_cast<uint32>(MyProc->pgprocno) + 1;
        pg_atomic_compare_exchange_u32(&state->worker_procno_plus1, &mine, 0);
        // Anyone waiting in pool_check_health() re-checks and sees the worker is gone.
        ConditionVariableBroadcast(&state->check_cv);
    }
}

void Log(int level, const std::string &message)
{
    pg::Call([&] { ereport(level, (errmsg_internal("pg_peerpool: %s", message.c_str()))); });
}

class PoolManager final : public Fleet, public RequestHost {
public:
    ~PoolManager() override;
    void Run();

    // Fleet
    bool ReserveConnection(Node *requester, bool evict, TimestampTz waiter_since) override;
    void ReleaseConnection() override;
    bool YieldBudget(const Node *node, TimestampTz since, TimestampTz now) override;
    void BudgetWaitEnded(const Node *node) override { budget_waits_.erase(node); }
    void RaiseDescriptorLimit();
    uint64 NextConnectionId() override { return ++last_connection_id_; }
    EventLog &events() override { return events_; }
    Resolver &resolver() override { return resolver_; }
    Canceller &canceller() override { return canceller_; }
    bool MayStartConnecting() const override { return connecting_ < kMaxConnecting; }
    bool ConnectionStorm() const override { return connecting_ >= kStormConnecting; }
    void ConnectingChanged(int delta) override { connecting_ += delta; }
    void NodeDirty(Node *node) override { dirty_nodes_.push_back(node); }
    void NodeSocketsChanged(Node *node) override { socket_nodes_.push_back(node); }
    void NodeManaged(Node *node, TimestampTz wake, bool has_waiters) override;
    void NodeGone(Node *node) override;
    bool Grant(const LeaseOwner &owner, Node &node, Connection &conn, TimestampTz now) override;
    void LeaseReady(const LeaseOwner &owner, Node &node, Connection &conn,
                    TimestampTz now) override;
    void LeaseLost(const LeaseOwner &owner, const std::string &error, TimestampTz now) override;
    void WaitFailed(const LeaseOwner &owner, int sqlerrcode, const std::string &error,
                    TimestampTz now) override;

    // RequestHost
    Node *FindNode(const std::string &name) override;
    std::vector<Node *> NodesByName() override;
    uint64 &RoundRobin() override { return round_robin_; }

private:
    bool TakeDescriptor();
    void GiveDescriptor();
    Request *FindRequest(uint64 key);
    template <typename F> auto Guarded(Request *r, F &&step) -> decltype(step());
    void ScanRequestSlots(TimestampTz now);
    void StepRequests(TimestampTz now);
    void SyncRegistryIfNeeded(TimestampTz now);
    void ApplyRegistry(Registry registry, uint64 generation, TimestampTz now);
    void RebuildWaitSetIfNeeded();
    bool UpdateChangedSockets();
    void ManageDueNodes(TimestampTz now);
    void RemoveDrainedNodes();
    void Unschedule(Node *node);
    void ManageEveryNode(TimestampTz now);
    long SleepMs(TimestampTz now);
    void DispatchEvents(const WaitEvent *fired, int count, TimestampTz now);
    void Shutdown();

    std::vector<NodeConfig> configs_;
    std::map<std::string, std::unique_ptr<Node>> nodes_;
    // nodes_ in the same order, for the passes over the whole fleet on every wake-up (a vector
    // walks 1,000 nodes several times faster than the map). Rebuilt when nodes_ changes.
    std::vector<Node *> node_list_;
    bool node_list_stale_ = true;
    const std::vector<Node *> &NodeList();
    // The loop's bookkeeping: a wake-up costs what changed, not the size of the fleet. Nodes to
    // manage on the next pass (MarkDirty), nodes whose sockets changed, nodes with waiting
    // callers (managed on every pass), every node's next timer, and draining nodes.
    std::vector<Node *> dirty_nodes_;
    std::vector<Node *> dirty_scratch_;
    std::vector<Node *> socket_nodes_;
    std::set<Node *> waiting_nodes_;
    // Every node's next timer: a binary min-heap with lazy deletion (no allocation per
    // reschedule, which happens at every check): an entry counts only while its `seq` is still
    // the node's loop.timer_seq.
    struct Timer {
        TimestampTz at;
        Node *node;
        uint64 seq;
        bool operator>(const Timer &o) const { return at > o.at; }
    };
    std::vector<Timer> timers_;
    uint64 timer_seq_ = 0;
    void DropStaleTimers();
    // Removes the entries `drop` selects and restores the heap.
    template <typename Pred> void RemoveTimers(Pred drop)
    {
        timers_.erase(std::remove_if(timers_.begin(), timers_.end(), drop), timers_.end());
        std::make_heap(timers_.begin(), timers_.end(), std::greater<Timer>());
    }
    std::set<Node *> draining_;
    std::vector<Node *> due_; // scratch of ManageDueNodes
    uint64 pass_ = 0;
    uint64 seen_check_requests_ = 0;
    bool full_socket_rebuild_ = true;
    TimestampTz next_verify_ = 0;
    TimestampTz next_socket_verify_ = 0;
    EventLog events_;
    Resolver resolver_;
    Canceller canceller_;
    // Nodes whose callers wait for the fleet budget (max_total_connections), with the oldest
    // such caller's wait start; `held_at` != 0: a unit was freed for this node then, and only
    // it may take the unit until it does (or for kBudgetHoldMs).
    struct BudgetWait {
        Node *node;
        TimestampTz since;
        TimestampTz held_at;
    };
    std::map<const Node *, BudgetWait> budget_waits_;
    int HeldUnits(const Node *except, TimestampTz now);
    uint64 loaded_generation_ = 0;
    bool first_load_ = true;
    bool extension_present_ = false;
    bool registry_blocked_ = false; // the last load failed (logged once)
    bool waiting_for_slot_ = false; // registered nodes found no free slot at the last load
    bool place_pending_ = false;    // a slot freed since: load again
    TimestampTz next_recheck_ = 0;
    uint64 last_connection_id_ = 0;
    int total_connections_ = 0;
    int connecting_ = 0; // connection attempts in flight (MayStartConnecting)
    // Descriptors for connections: from fd.c's external allowance, and from our own headroom.
    int fds_external_ = 0;
    int fds_extra_ = 0;
    int fds_headroom_ = 0;
    rlim_t fds_limit_ = 0;
    TimestampTz fd_warning_at_ = 0;

    // Callers' requests, by key; and which slot each came from.
    std::map<uint64, std::unique_ptr<Request>> requests_;
    std::map<int, uint64> request_by_slot_;
    uint64 last_request_key_ = 0;
    uint64 seen_request_events_ = UINT64_MAX;
    uint32 generation_ = 0;
    uint64 round_robin_ = 0;

    // The wait set and what it was built for; user_data of a socket event points into
    // `registered_` (stable until the next rebuild).
    struct Registered {
        Node *node;
        uint64 conn_id;
        pgsocket socket;
        uint32 events;
        uint32 epoch;
        int position; // in wait_set_
    };
    WaitEventSet *wait_set_ = nullptr;
    std::vector<Registered> registered_;
    std::vector<Registered> wanted_;              // scratch of RebuildWaitSetIfNeeded
    std::vector<Node::SocketInterest> interests_; // scratch of RebuildWaitSetIfNeeded
    std::vector<WaitEvent> fired_;
};

PoolManager::~PoolManager()
{
    requests_.clear(); // detaches every caller's queues (they see the pool manager leave)
    nodes_.clear();    // closes every connection
    if (wait_set_ != nullptr)
        FreeWaitEventSet(wait_set_); // only frees memory
}

// One descriptor for a new connection: first from PostgreSQL's allowance for external
// descriptors (a third of max_safe_fds), then from the headroom we gained by raising our own
// soft RLIMIT_NOFILE (RaiseDescriptorLimit), which fd.c never uses.
bool PoolManager::TakeDescriptor()
{
    if (AcquireExternalFD()) {
        fds_external_++;
        return true;
    }
    if (fds_extra_ < fds_headroom_) {
        fds_extra_++;
        return true;
    }
    return false;
}

void PoolManager::GiveDescriptor()
{
    if (fds_extra_ > 0)
        fds_extra_--;
    else if (fds_external_ > 0) {
        fds_external_--;
        ReleaseExternalFD();
    }
}

// Units freed for a node by YieldBudget and not yet taken (expired holds are dropped).
int PoolManager::HeldUnits(const Node *except, TimestampTz now)
{
    int held = 0;
    for (auto it = budget_waits_.begin(); it != budget_waits_.end();) {
        BudgetWait &w = it->second;
        if (w.held_at != 0 && now >= TimestampTzPlusMilliseconds(w.held_at, kBudgetHoldMs)) {
            it = budget_waits_.erase(it); // not taken in time: the unit is anyone's again
            continue;
        }
        if (w.held_at != 0 && it->first != except)
            held++;
        ++it;
    }
    return held;
}

bool PoolManager::YieldBudget(const Node *node, TimestampTz since, TimestampTz now)
{
    if (peerpool_max_total_connections <= 0 || budget_waits_.empty() ||
        total_connections_ < peerpool_max_total_connections)
        return false; // no budget contention: whoever wants a unit can take one
    // Only to a node with at least two connections fewer: a handover costs a connection set-up,
    // so units move until the shares are within one of each other, not for every call.
    int mine = node->connection_count();
    BudgetWait *oldest = nullptr;
    for (auto &[key, w] : budget_waits_)
        if (key != node && w.held_at == 0 && w.since < since &&
            w.node->connection_count() + 1 < mine && (oldest == nullptr || w.since < oldest->since))
            oldest = &w;
    if (oldest == nullptr)
        return false;
    oldest->held_at = now;
    oldest->node->Touch(); // it opens its connection on the next pass of the loop
    return true;
}

bool PoolManager::ReserveConnection(Node *requester, bool evict, TimestampTz waiter_since)
{
    // Each libpq socket counts against the process's file descriptors; take it first so a
    // refusal never costs another node its connection.
    if (!TakeDescriptor()) {
        TimestampTz now = GetCurrentTimestamp();
        if (now >= fd_warning_at_) {
            // A local limit, not the node: said plainly, at most once a minute.
            fd_warning_at_ = TimestampTzPlusMilliseconds(now, 60000);
            Log(WARNING,
                Format("no file descriptor left for another connection (node \"%s\"): "
                       "%d in use; the pool manager's limit is RLIMIT_NOFILE %llu "
                       "(raise the hard limit, e.g. LimitNOFILE in the service unit) "
                       "and max_files_per_process; the node is not at fault",
                       requester ? requester->name().c_str() : "?", fds_external_ + fds_extra_,
                       static_cast<unsigned long long>(fds_limit_)));
        }
        return false;
    }
    TimestampTz now = GetCurrentTimestamp();
    auto wait_for_budget = [&] {
        GiveDescriptor();
        if (requester != nullptr && waiter_since != 0) {
            auto [it, added] = budget_waits_.try_emplace(requester,
                                                         BudgetWait{requester, waiter_since, 0});
            if (!added && it->second.held_at == 0)
                it->second.since = std::min(it->second.since, waiter_since);
        }
        return false;
    };
    // A unit freed for another node (YieldBudget) is not ours to take.
    int held = peerpool_max_total_connections > 0 && !budget_waits_.empty()
                   ? HeldUnits(requester, now)
                   : 0;
    if (peerpool_max_total_connections > 0 &&
        total_connections_ + held >= peerpool_max_total_connections) {
        if (!evict)
            return wait_for_budget();
        // The budget is spent: close the least recently used idle connection of any node.
        Node *victim = nullptr;
        TimestampTz victim_lru = 0;
        for (auto &[name, node] : nodes_) {
            TimestampTz lru = 0;
            if (node.get() != requester && node->OldestIdle(lru) &&
                (victim == nullptr || lru < victim_lru)) {
                victim = node.get();
                victim_lru = lru;
            }
        }
        if (victim == nullptr || !victim->CloseOldestIdle())
            return wait_for_budget();
    }
    total_connections_++;
    if (requester != nullptr)
        budget_waits_.erase(requester); // served (a unit held for it is taken now)
    return true;
}

void PoolManager::ReleaseConnection()
{
    total_connections_--;
    GiveDescriptor();
}

// A stock Debian postmaster runs with a soft limit of 1024 descriptors, of which PostgreSQL
// lets us take about 330: far fewer than 1,000 nodes need (SPEC section 7). Raise our own soft
// limit as far as the hard limit allows; what we gain is ours alone.
void PoolManager::RaiseDescriptorLimit()
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t old = rl.rlim_cur;
    rlim_t want = rl.rlim_max == RLIM_INFINITY ? kMaxDescriptors
                                               : std::min<rlim_t>(rl.rlim_max, kMaxDescriptors);
    if (want > old) {
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
            fds_headroom_ = static_cast<int>(want - old);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    fds_limit_ = rl.rlim_cur;
    Log(LOG,
        Format("descriptor limit %llu (was %llu, hard limit %s): room for about %d "
               "connections",
               static_cast<unsigned long long>(rl.rlim_cur), static_cast<unsigned long long>(old),
               rl.rlim_max == RLIM_INFINITY
                   ? "unlimited"
                   : std::to_string(static_cast<unsigned long long>(rl.rlim_max)).c_str(),
               fds_headroom_ + max_safe_fds / 3));
}

Node *PoolManager::FindNode(const std::string &name)
{
    auto it = nodes_.find(name);
    return it == nodes_.end() ? nullptr : it->second.get();
}

std::vector<Node *> PoolManager::NodesByName()
{
    std::vector<Node *> out;
    out.reserve(nodes_.size());
    for (auto &[name, node] : nodes_) // std::map: sorted by name
        out.push_back(node.get());
    return out;
}

Request *PoolManager::FindRequest(uint64 key)
{
    auto it = requests_.find(key);
    return it == requests_.end() ? nullptr : it->second.get();
}

// Runs one step of one request. Anything that escapes it (out of memory, an ERROR raised by a
// queue operation, malformed data) fails that request alone; the nodes never see it.
template <typename F> auto PoolManager::Guarded(Request *r, F &&step) -> decltype(step())
{
    try {
        return step();
    } catch (const std::exception &e) {
        std::string what = e.what();
        try {
            Log(WARNING, Format("request %llu failed inside the pool manager: %s",
                                static_cast<unsigned long long>(r->key()), what.c_str()));
            r->FailInternal("pg_peerpool could not serve this request: " + what);
        } catch (...) {
            r->Abandon(GetCurrentTimestamp());
        }
    } catch (...) {
        r->Abandon(GetCurrentTimestamp());
    }
    return decltype(step())();
}

bool PoolManager::Grant(const LeaseOwner &owner, Node &node, Connection &conn, TimestampTz now)
{
    Request *r = FindRequest(owner.request_key);
    return r != nullptr && Guarded(r, [&] { return r->OnGrant(owner.task, node, conn, now); });
}

void PoolManager::LeaseReady(const LeaseOwner &owner, Node &node, Connection &conn, TimestampTz now)
{
    if (Request *r = FindRequest(owner.request_key))
        Guarded(r, [&] { r->OnReady(owner.task, node, conn, now); });
}

void PoolManager::LeaseLost(const LeaseOwner &owner, const std::string &error, TimestampTz now)
{
    if (Request *r = FindRequest(owner.request_key))
        Guarded(r, [&] { r->OnLost(owner.task, error, now); });
}

void PoolManager::WaitFailed(const LeaseOwner &owner, int sqlerrcode, const std::string &error,
                             TimestampTz now)
{
    if (Request *r = FindRequest(owner.request_key))
        Guarded(r, [&] { r->OnWaitFailed(owner.task, sqlerrcode, error, now); });
}

// Picks up submitted requests and callers that gave up. Runs when a backend signalled a
// change (request_events), so an idle fleet does not scan the slots at all.
void PoolManager::ScanRequestSlots(TimestampTz now)
{
    SharedState &state = RequireShared();
    uint64 events = pg_atomic_read_u64(&state.request_events);
    if (events == seen_request_events_)
        return;
    seen_request_events_ = events;
    for (int i = 0; i < NumRequestSlots(); i++) {
        RequestSlot *slot = GetRequestSlot(i);
        SpinLockAcquire(&slot->mutex);
        RequestSlotState slot_state = slot->state;
        bool cancel = slot->cancel;
        uint32 generation = slot->worker_generation;
        if (slot_state != REQUEST_SLOT_FREE && generation != generation_ &&
            request_by_slot_.count(i) == 0)
            slot->state = REQUEST_SLOT_FREE; // submitted to a pool manager that is gone
        SpinLockRelease(&slot->mutex);
        if (slot_state == REQUEST_SLOT_FREE || generation != generation_)
            continue;
        auto known = request_by_slot_.find(i);
        if (known != request_by_slot_.end()) {
            if (cancel)
                requests_[known->second]->Abandon(now);
            continue;
        }
        if (slot_state == REQUEST_SLOT_SUBMITTED && !cancel) {
            uint64 key = ++last_request_key_;
            try {
                // Its deadlines (timeout_ms, acquire_timeout) count from now, read afresh: the
                // pass's `now` can predate the submission by the length of the pass, and a
                // caller would then see 53300 a few ms before its acquire_timeout.
                requests_[key] = std::make_unique<Request>(*this, i, key, GetCurrentTimestamp());
                if (shutdown_requested)
                    // Draining for shutdown: take no new work, say so at once (SPEC section 7).
                    requests_[key]
                        ->Refuse(ERRCODE_ADMIN_SHUTDOWN,
                                 "the pg_peerpool pool manager is shutting down",
                                 "It takes no new calls while its running calls finish; "
                                 "it restarts automatically unless the server is stopping.");
            } catch (const std::exception &e) {
                // Could not even attach: free the slot; the caller sees it and fails.
                requests_.erase(key);
                Log(WARNING, Format("could not take a request: %s", e.what()));
                SpinLockAcquire(&slot->mutex);
                slot->state = REQUEST_SLOT_FREE;
                SpinLockRelease(&slot->mutex);
                SetLatch(&ProcGlobal->allProcs[i].procLatch);
                continue;
            }
            request_by_slot_[i] = key;
        } else if (cancel) {
            // Abandoned before we picked it up: nothing to undo, the slot is free again.
            SpinLockAcquire(&slot->mutex);
            if (slot->state == REQUEST_SLOT_SUBMITTED && slot->cancel)
                slot->state = REQUEST_SLOT_FREE;
            SpinLockRelease(&slot->mutex);
            SetLatch(&ProcGlobal->allProcs[i].procLatch);
        }
    }
}

void PoolManager::StepRequests(TimestampTz now)
{
    for (auto it = requests_.begin(); it != requests_.end();) {
        Request *r = it->second.get();
        Guarded(r, [&] { r->Step(now); });
        if (it->second->Finished()) {
            request_by_slot_.erase(it->second->slot());
            it = requests_.erase(it); // detaches, frees the slot
        } else {
            ++it;
        }
    }
}

void PoolManager::SyncRegistryIfNeeded(TimestampTz now)
{
    SharedState &state = RequireShared();
    uint64 generation = pg_atomic_read_u64(&state.registry_generation);
    if (generation == loaded_generation_ && now < next_recheck_ && !place_pending_)
        return;
    if (registry_blocked_ && now < next_recheck_)
        return; // the last load failed: not again before the retry time

    Registry registry;
    try {
        registry = LoadRegistry();
    } catch (const Error &e) {
        // Typically a lock somebody holds on peerpool.node (lock_timeout): retry in a second,
        // serving with the registry we have. Said once per episode, not once per retry.
        if (!registry_blocked_)
            Log(WARNING, Format("could not load the node registry, retrying every second: %s",
                                e.message().c_str()));
        registry_blocked_ = true;
        next_recheck_ = TimestampTzPlusMilliseconds(now, kRetryAfterErrorMs);
        return;
    }
    if (registry_blocked_)
        Log(LOG, "node registry loaded again");
    registry_blocked_ = false;
    if (first_load_ || registry.extension_present != extension_present_)
        Log(LOG, registry.extension_present
                     ? Format("extension found in database \"%s\", managing its nodes",
                              peerpool_database)
                     : Format("extension not installed in database \"%s\", waiting for "
                              "CREATE EXTENSION pg_peerpool",
                              peerpool_database));
    first_load_ = false;
    extension_present_ = registry.extension_present;
    place_pending_ = false;
    ApplyRegistry(std::move(registry), generation, GetCurrentTimestamp());
    loaded_generation_ = generation;
    next_recheck_ = TimestampTzPlusMilliseconds(now, kRecheckMs);
}

void PoolManager::ApplyRegistry(Registry registry, uint64 generation, TimestampTz now)
{
    RegistryDiff diff = DiffRegistry(configs_, registry.nodes);

    // A name removed and re-added while it drained starts over.
    for (const NodeConfig &n : diff.added) {
        auto it = nodes_.find(n.name);
        if (it != nodes_.end()) {
            nodes_.erase(it);
            node_list_stale_ = true;
            FreeNodeSlot(n.name);
        }
    }
    MirrorRegistry(registry, generation);

    SharedState &state = RequireShared();
    std::set<std::string> unplaced;
    for (const NodeConfig &n : diff.added) {
        // LWLockAcquire errors only when too many LWLocks are held (never here).
        LWLockAcquire(state.lock, LW_SHARED);
        int slot = FindNodeSlot(state, n.name.c_str());
        LWLockRelease(state.lock);
        if (slot < 0) {
            // No free slot (MirrorRegistry warned), e.g. while a removed node still drains:
            // left out of configs_ so that the next load adds it, which a finished drain
            // triggers (place_pending_).
            unplaced.insert(n.name);
            continue;
        }
        nodes_[n.name] = std::make_unique<Node>(*this, n, slot, now, loaded_generation_ == 0);
        node_list_stale_ = true;
        full_socket_rebuild_ = true;
    }
    for (const NodeConfig &n : diff.changed) {
        auto it = nodes_.find(n.name);
        if (it != nodes_.end()) {
            Log(LOG, Format("node \"%s\" reconfigured", n.name.c_str()));
            it->second->Reconfigure(n, now);
        }
    }
    for (const std::string &name : diff.removed) {
        auto it = nodes_.find(name);
        if (it != nodes_.end()) {
            it->second->StartDraining(now);
            draining_.insert(it->second.get());
        } else
            FreeNodeSlot(name);
    }
    if (!unplaced.empty())
        registry.nodes.erase(std::remove_if(registry.nodes.begin(), registry.nodes.end(),
                                            [&](const NodeConfig &n) {
                                                return unplaced.count(n.name) != 0;
                                            }),
                             registry.nodes.end());
    waiting_for_slot_ = !unplaced.empty();
    configs_ = std::move(registry.nodes);
}

const std::vector<Node *> &PoolManager::NodeList()
{
    if (node_list_stale_) {
        node_list_.clear();
        for (auto &[name, node] : nodes_)
            node_list_.push_back(node.get());
        node_list_stale_ = false;
    }
    return node_list_;
}

void PoolManager::NodeManaged(Node *node, TimestampTz wake, bool has_waiters)
{
    if (node->loop.scheduled_wake != wake) {
        Unschedule(node);
        if (wake != 0) {
            node->loop.scheduled_wake = wake;
            node->loop.timer_seq = ++timer_seq_;
            timers_.push_back({wake, node, timer_seq_});
            std::push_heap(timers_.begin(), timers_.end(), std::greater<Timer>());
            // Stale entries leave as their time comes; keep them from piling up anyway.
            if (timers_.size() > 4 * nodes_.size() + 64)
                RemoveTimers([](const Timer &t) { return t.seq != t.node->loop.timer_seq; });
        }
    }
    if (node->loop.has_waiters != has_waiters) {
        node->loop.has_waiters = has_waiters;
        if (has_waiters)
            waiting_nodes_.insert(node);
        else
            waiting_nodes_.erase(node);
    }
}

void PoolManager::Unschedule(Node *node)
{
    node->loop.scheduled_wake = 0;
    node->loop.timer_seq = 0; // its entry, if any, is stale from now on
}

// The passes of Shutdown manage every node, not only the due ones (ManageDueNodes). The dirty
// list is emptied first: it would otherwise stay full and SleepMs keep returning 0.
void PoolManager::ManageEveryNode(TimestampTz now)
{
    for (Node *node : dirty_nodes_)
        node->loop.in_dirty_list = false;
    dirty_nodes_.clear();
    for (auto &[name, node] : nodes_)
        node->Manage(now);
}

void PoolManager::DropStaleTimers()
{
    while (!timers_.empty() && timers_.front().seq != timers_.front().node->loop.timer_seq) {
        std::pop_heap(timers_.begin(), timers_.end(), std::greater<Timer>());
        timers_.pop_back();
    }
}

void PoolManager::NodeGone(Node *node)
{
    Unschedule(node);
    // Its entries must go now: the pointer dies with it.
    RemoveTimers([node](const Timer &t) { return t.node == node; });
    waiting_nodes_.erase(node);
    draining_.erase(node);
    auto drop = [node](std::vector<Node *> &v) {
        v.erase(std::remove(v.begin(), v.end(), node), v.end());
    };
    drop(dirty_nodes_);
    drop(socket_nodes_);
    full_socket_rebuild_ = true;
}

// Manages the nodes that have something to do: touched since (dirty), a timer due, callers
// waiting, a pool_check_health() request. Every kVerifyMs the whole fleet is walked as well,
// and a node found due that the bookkeeping missed is logged (an internal error) and managed.
void PoolManager::ManageDueNodes(TimestampTz now)
{
    uint64 pass = ++pass_;
    due_.clear();
    auto queue = [&](Node *node) {
        if (node->loop.queued_pass != pass) {
            node->loop.queued_pass = pass;
            due_.push_back(node);
        }
    };
    dirty_scratch_.clear();
    dirty_scratch_.swap(dirty_nodes_);
    for (Node *node : dirty_scratch_) {
        node->loop.in_dirty_list = false;
        queue(node);
    }
    for (Node *node : waiting_nodes_)
        queue(node);
    for (DropStaleTimers(); !timers_.empty() && timers_.front().at <= now; DropStaleTimers()) {
        Node *node = timers_.front().node;
        std::pop_heap(timers_.begin(), timers_.end(), std::greater<Timer>());
        timers_.pop_back();
        Unschedule(node);
        queue(node);
    }
    uint64 requests = pg_atomic_read_u64(&RequireShared().check_requests);
    pg_read_barrier(); // pairs with the full barrier of the requester's fetch_add (stats.cpp)
    bool verify = now >= next_verify_;
    if (requests != seen_check_requests_ || verify) {
        seen_check_requests_ = requests;
        for (Node *node : NodeList()) {
            if (node->loop.queued_pass == pass)
                continue;
            if (node->CheckRequested()) {
                queue(node);
            } else if (verify && node->Due(now)) {
                Log(LOG, Format("internal: node \"%s\" was due but not scheduled",
                                node->name().c_str()));
                queue(node);
            }
        }
        if (verify)
            next_verify_ = TimestampTzPlusMilliseconds(now, kVerifyMs);
    }
    for (size_t i = 0; i < due_.size(); i++)
        due_[i]->Manage(now);
    due_.clear();
}

void PoolManager::RemoveDrainedNodes()
{
    if (draining_.empty())
        return;
    std::vector<std::string> done;
    for (Node *node : draining_)
        if (node->Drained())
            done.push_back(node->name());
    for (const std::string &name : done) {
        nodes_.erase(name); // ~Node: NodeGone
        node_list_stale_ = true;
        FreeNodeSlot(name);
        Log(LOG, Format("node \"%s\" drained and removed", name.c_str()));
        if (waiting_for_slot_)
            place_pending_ = true; // a node registered meanwhile can start now
    }
}

// Only the nodes whose sockets changed: when each still has the same sockets, what we wait for
// on them is updated in place (one epoll_ctl each). Returns false when the set of sockets itself
// changed, which needs a new wait set.
bool PoolManager::UpdateChangedSockets()
{
    bool same = true;
    for (Node *node : socket_nodes_) {
        node->loop.sockets_changed = false;
        if (!same)
            continue;
        interests_.clear();
        node->CollectSockets(interests_);
        if (interests_.size() != node->loop.wait_count) {
            same = false;
            continue;
        }
        for (size_t i = 0; same && i < interests_.size(); i++) {
            const Registered &r = registered_[node->loop.wait_begin + i];
            same = r.node == node && r.conn_id == interests_[i].conn_id &&
                   r.socket == interests_[i].socket && r.epoch == interests_[i].epoch;
        }
        if (!same)
            continue;
        WaitEventSet *set = wait_set_;
        for (size_t i = 0; i < interests_.size(); i++) {
            Registered &r = registered_[node->loop.wait_begin + i];
            uint32 events = interests_[i].events;
            if (events == r.events)
                continue;
            pg::Call([&] { ModifyWaitEvent(set, r.position, events, nullptr); });
            r.events = events;
        }
    }
    socket_nodes_.clear();
    return same;
}

void PoolManager::RebuildWaitSetIfNeeded()
{
    TimestampTz now = GetCurrentTimestamp();
    bool verify = now >= next_socket_verify_;
    // A change the full walk finds that nobody reported is an internal error (logged below).
    bool reported = full_socket_rebuild_ || !socket_nodes_.empty();
    if (wait_set_ != nullptr && !full_socket_rebuild_ && !verify && UpdateChangedSockets())
        return;
    next_socket_verify_ = TimestampTzPlusMilliseconds(now, kVerifyMs);
    for (Node *node : socket_nodes_)
        node->loop.sockets_changed = false;
    socket_nodes_.clear();
    full_socket_rebuild_ = false;

    std::vector<Registered> &wanted = wanted_; // reused: no allocation on a wake-up
    wanted.clear();
    for (Node *node : NodeList()) {
        interests_.clear();
        node->CollectSockets(interests_);
        node->loop.wait_begin = wanted.size();
        node->loop.wait_count = interests_.size();
        for (const auto &i : interests_)
            wanted.push_back({node, i.conn_id, i.socket, i.events, i.epoch, -1});
    }
    bool same = wait_set_ != nullptr && wanted.size() == registered_.size();
    for (size_t i = 0; same && i < wanted.size(); i++)
        same = wanted[i].node == registered_[i].node &&
               wanted[i].conn_id == registered_[i].conn_id &&
               wanted[i].socket == registered_[i].socket && wanted[i].epoch == registered_[i].epoch;
    if (same) {
        // The same sockets: only what we wait for on some of them changed (a query sent, a
        // connection attempt turning from writing to reading). One epoll_ctl each, instead of
        // a new set with every socket of the fleet in it.
        WaitEventSet *set = wait_set_;
        for (size_t i = 0; i < wanted.size(); i++) {
            if (wanted[i].events == registered_[i].events)
                continue;
            Registered &r = registered_[i];
            if (!reported) // found only by the periodic walk: a change nobody reported
                Log(LOG, Format("internal: stale wait events for a connection of node \"%s\"",
                                r.node->name().c_str()));
            uint32 events = wanted[i].events;
            pg::Call([&] { ModifyWaitEvent(set, r.position, events, nullptr); });
            r.events = events;
        }
        return;
    }

    if (!reported && wait_set_ != nullptr)
        Log(LOG, "internal: the sockets of the wait set changed without being reported");
    registered_.swap(wanted);
    WaitEventSet *old = wait_set_;
    wait_set_ = nullptr;
    Registered *entries = registered_.data();
    size_t count = registered_.size();
    int resolver_fd = resolver_.fd();
    int canceller_fd = canceller_.fd();
    wait_set_ = pg::Call([&] {
        if (old != nullptr)
            FreeWaitEventSet(old);
        WaitEventSet *set = CreateWaitEventSet(TopMemoryContext, static_cast<int>(count) + 4);
        AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, nullptr);
        AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, nullptr, nullptr);
        if (resolver_fd >= 0)
            AddWaitEventToSet(set, WL_SOCKET_READABLE, resolver_fd, nullptr, &resolver_);
        if (canceller_fd >= 0)
            AddWaitEventToSet(set, WL_SOCKET_READABLE, canceller_fd, nullptr, &canceller_);
        for (size_t i = 0; i < count; i++)
            entries[i].position = AddWaitEventToSet(set, entries[i].events, entries[i].socket,
                                                    nullptr, &entries[i]);
        return set;
    });
}

long PoolManager::SleepMs(TimestampTz now)
{
    if (!dirty_nodes_.empty())
        return 0; // touched after it was managed (a request step): manage it first
    TimestampTz wake = next_recheck_;
    DropStaleTimers();
    if (!timers_.empty() && timers_.front().at < wake)
        wake = timers_.front().at;
    for (const auto &[key, request] : requests_) {
        TimestampTz t = request->NextWake();
        if (t != 0 && t < wake)
            wake = t;
    }
    if (events_.HasPending()) // a NOTIFY that could not be sent is retried within a second
        wake = std::min(wake, TimestampTzPlusMilliseconds(now, 1000));
    if (place_pending_)
        return 0; // load the registry again at once: a node waits for the freed slot
    long ms = TimestampDifferenceMilliseconds(now, wake);
    if (wake > now && ms == 0)
        ms = 1; // round sub-millisecond waits up rather than spin
    return std::min(ms, kMaxSleepMs);
}

void PoolManager::DispatchEvents(const WaitEvent *fired, int count, TimestampTz now)
{
    for (int i = 0; i < count; i++) {
        if (fired[i].user_data == &resolver_) {
            if (resolver_.Collect(now))
                for (auto &[name, node] : nodes_)
                    node->OnResolved(now);
            continue;
        }
        if (fired[i].user_data == &canceller_) {
            for (const Canceller::Result &r : canceller_.Collect()) {
                auto node = nodes_.find(r.group);
                if (node != nodes_.end())
                    node->second->CancelDone(r.token, r.ok, r.error, now);
            }
            continue;
        }
        if (!(fired[i].events & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE)) ||
            fired[i].user_data == nullptr)
            continue;
        auto *r = static_cast<Registered *>(fired[i].user_data);
        // The connection may have been closed by an earlier event of this batch; the node
        // looks it up by id and ignores it then.
        r->node->OnSocketReady(r->conn_id, now);
    }
}

void PoolManager::Shutdown()
{
    // Stop taking work; let callers' queries finish until drain_timeout, then cancel the rest.
    TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
                                                       peerpool_drain_timeout);
    // Calls that arrive from now on are refused (ScanRequestSlots); the drain waits only for
    // the calls accepted before, and ends as soon as they have.
    auto in_flight = [&] {
        for (const auto &[key, request] : requests_)
            if (!request->refused())
                return true;
        return false;
    };
    TimestampTz drain_started = GetCurrentTimestamp();
    while (in_flight() && GetCurrentTimestamp() < deadline) {
        TimestampTz now = GetCurrentTimestamp();
        ScanRequestSlots(now); // callers cancelled meanwhile get their queries cancelled
        ManageEveryNode(now);
        StepRequests(now);
        if (!in_flight())
            break;
        RebuildWaitSetIfNeeded();
        if (fired_.size() < registered_.size() + 4)
            fired_.resize(registered_.size() + 4);
        long timeout = std::max<long>(1, std::min<long>(SleepMs(now),
                                                        TimestampDifferenceMilliseconds(now,
                                                                                        deadline)));
        WaitEvent *events = fired_.data();
        int size = static_cast<int>(fired_.size());
        int n = pg::Call([&] {
            int got = WaitEventSetWait(wait_set_, timeout, events, size, PG_WAIT_EXTENSION);
            ResetLatch(MyLatch);
            return got;
        });
        DispatchEvents(events, n, GetCurrentTimestamp());
    }
    TimestampTz now = GetCurrentTimestamp();
    Log(LOG, Format("pool manager draining for shutdown took %.0f ms",
                    static_cast<double>(now - drain_started) / 1000.0));
    ScanRequestSlots(now); // refusals for the last arrivals
    StepRequests(now);     // and out they go
    for (auto &[key, request] : requests_)
        request->Abandon(now); // cancels remote queries still running
    requests_.clear();
    request_by_slot_.clear();
    // Give those cancels a moment to reach the nodes (bounded), so no remote query outlives us.
    TimestampTz cancel_deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
    for (;;) {
        bool busy = false;
        for (auto &[name, node] : nodes_)
            busy = busy || node->HasPendingCancels();
        now = GetCurrentTimestamp();
        if (!busy || now >= cancel_deadline)
            break;
        RebuildWaitSetIfNeeded();
        if (fired_.size() < registered_.size() + 4)
            fired_.resize(registered_.size() + 4);
        WaitEvent *events = fired_.data();
        int size = static_cast<int>(fired_.size());
        int n = pg::Call([&] {
            int got = WaitEventSetWait(wait_set_, 50, events, size, PG_WAIT_EXTENSION);
            ResetLatch(MyLatch);
            return got;
        });
        DispatchEvents(events, n, GetCurrentTimestamp());
        ManageEveryNode(GetCurrentTimestamp());
    }
    // Closing sends Terminate, so the peers end our sessions at once.
    size_t closed = 0;
    for (auto &[name, node] : nodes_) {
        closed++;
        node->CloseAll();
    }
    Log(LOG, Format("pool manager shutting down; closed the pools of %zu nodes", closed));
}

void PoolManager::Run()
{
    SharedState &state = RequireShared();
    // A new generation before we become reachable: requests are stamped with it.
    generation_ = pg_atomic_add_fetch_u32(&state.worker_generation, 1);
    pg::Call([&] {
        before_shmem_exit(ForgetWorker, 0);
        LWLockAcquire(state.lock, LW_EXCLUSIVE);
        state.worker_pid = MyProcPid;
        LWLockRelease(state.lock);
        pg_atomic_write_u32(&state.worker_procno_plus1, static_cast<uint32>(MyProc->pgprocno) + 1);
    });
    // The loop never waits on a heavyweight lock or on a synchronous standby: its only
    // transactions (reading peerpool.node, sending NOTIFY) give up after kLockTimeout and are
    // retried later, and their commits wait for the local WAL flush only. Set at the highest
    // priority, so a reload of postgresql.conf cannot undo it.
    pg::Call([] {
        SetConfigOption("lock_timeout", kLockTimeout, PGC_SUSET, PGC_S_OVERRIDE);
        SetConfigOption("synchronous_commit", "local", PGC_SUSET, PGC_S_OVERRIDE);
    });
    // A (re)started pool manager owns no connections: whatever a previous one published is
    // stale. The registry is mirrored again on the first pass.
    ClearNodeSlots();

    MemoryContext scratch = pg::Call([] {
        return AllocSetContextCreate(TopMemoryContext, "pg_peerpool loop scratch",
                                     ALLOCSET_DEFAULT_SIZES);
    });

    Log(LOG, Format("pool manager started (database \"%s\")", peerpool_database));
    RaiseDescriptorLimit();
    fired_.resize(64);
    while (!shutdown_requested) {
        AbsorbCancel(); // flag operations only: cannot error
        if (cancel_requested) {
            cancel_requested = false;
            Log(LOG, "ignoring a cancel request (SIGINT): the pool manager runs no statement of "
                     "its own; callers cancel their own calls");
        }
        if (ConfigReloadPending) {
            ConfigReloadPending = false;
            pg::Call([] { ProcessConfigFile(PGC_SIGHUP); });
            for (auto &[name, node] : nodes_)
                node->Touch(); // timers depend on the settings
        }

        TimestampTz now = GetCurrentTimestamp();
        SyncRegistryIfNeeded(now);

        now = GetCurrentTimestamp();
        ScanRequestSlots(now);
        ManageDueNodes(now); // most of a large fleet has nothing to do on a given wake
        StepRequests(now);
        RemoveDrainedNodes();
        AbsorbCancel(); // a cancel request must not abort the NOTIFY transaction
        events_.Flush(GetCurrentTimestamp());

        RebuildWaitSetIfNeeded();
        if (fired_.size() < registered_.size() + 4)
            fired_.resize(registered_.size() + 4);
        long timeout = SleepMs(GetCurrentTimestamp());
        timeout = PublishHeartbeat(timeout); // for the views: at least one wake a second
        WaitEvent *events = fired_.data();
        int size = static_cast<int>(fired_.size());
        int nfired = pg::Call([&] {
            MemoryContextReset(scratch);
            int n = WaitEventSetWait(wait_set_, timeout, events, size, PG_WAIT_EXTENSION);
            ResetLatch(MyLatch);
            CheckLoopInterrupts();
            return n;
        });
        DispatchEvents(events, nfired, GetCurrentTimestamp());
    }
    Shutdown();
}

} // namespace

void RegisterPoolManager()
{
    BackgroundWorker worker;
    memset(&worker, 0, sizeof(worker));
    worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
    worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
    worker.bgw_restart_time = 1; // seconds; a crash restart is immediate anyway
    strlcpy(worker.bgw_library_name, "pg_peerpool", BGW_MAXLEN);
    strlcpy(worker.bgw_function_name, "peerpool_pool_manager_main", BGW_MAXLEN);
    strlcpy(worker.bgw_name, "pg_peerpool pool manager", BGW_MAXLEN);
    strlcpy(worker.bgw_type, "pg_peerpool pool manager", BGW_MAXLEN);
    RegisterBackgroundWorker(&worker);
}

} // namespace peerpool

// The worker's entry point. A C++ failure is raised as ERROR only after every C++ frame is
// gone; the bgworker then exits with code 1 and the postmaster restarts it.
void peerpool_pool_manager_main(Datum)
{
    pqsignal(SIGTERM, peerpool::HandleSigterm);
    pqsignal(SIGHUP, SignalHandlerForConfigReload);
    BackgroundWorkerUnblockSignals();
    BackgroundWorkerInitializeConnection(peerpool_database, nullptr, 0);
    // libpq would pass the postmaster's own client settings on to every peer session; the
    // text formats of our sessions are fixed in ConnectionOptions instead.
    unsetenv("PGDATESTYLE");
    unsetenv("PGTZ");
    unsetenv("PGOPTIONS");

    peerpool::PendingError pending;
    if (!peerpool::CatchAll([] { peerpool::PoolManager().Run(); }, pending))
        pending.Raise();
    // Exit code 1 even after a clean stop: at server shutdown the postmaster restarts nothing,
    // and after pg_terminate_backend() it restarts us -- the pools must not vanish for good.
    proc_exit(1);
}
