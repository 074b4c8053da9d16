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

#include <map>
#include <memory>

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
    bool ReserveConnection(const Node *requester, bool evict) override;
    void ReleaseConnection() override;
    uint64 NextConnectionId() override { return ++last_connection_id_; }
    EventLog &events() override { return events_; }
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
    Request *FindRequest(uint64 key);
    void ScanRequestSlots(TimestampTz now);
    void StepRequests(TimestampTz now);
    void SyncRegistryIfNeeded(TimestampTz now);
    void ApplyRegistry(Registry registry, uint64 generation, TimestampTz now);
    void RebuildWaitSetIfNeeded();
    long SleepMs(TimestampTz now) const;
    void DispatchEvents(const WaitEvent *fired, int count, TimestampTz now);
    void Shutdown();

    std::vector<NodeConfig> configs_;
    std::map<std::string, std::unique_ptr<Node>> nodes_;
    EventLog events_;
    uint64 loaded_generation_ = 0;
    bool first_load_ = true;
    bool extension_present_ = false;
    TimestampTz next_recheck_ = 0;
    uint64 last_connection_id_ = 0;
    int total_connections_ = 0;

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
    };
    WaitEventSet *wait_set_ = nullptr;
    std::vector<Registered> registered_;
    std::vector<WaitEvent> fired_;
};

PoolManager::~PoolManager()
{
    requests_.clear(); // detaches every caller's queues (they see the pool manager leave)
    nodes_.clear();    // closes every connection
    if (wait_set_ != nullptr)
        FreeWaitEventSet(wait_set_); // only frees memory
}

bool PoolManager::ReserveConnection(const Node *requester, bool evict)
{
    // Each libpq socket counts against the process's file descriptor allowance; take it first
    // so a refusal never costs another node its connection.
    if (!AcquireExternalFD())
        return false;
    if (peerpool_max_total_connections > 0 &&
        total_connections_ >= peerpool_max_total_connections) {
        if (!evict) {
            ReleaseExternalFD();
            return false;
        }
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
        if (victim == nullptr || !victim->CloseOldestIdle()) {
            ReleaseExternalFD();
            return false;
        }
    }
    total_connections_++;
    return true;
}

void PoolManager::ReleaseConnection()
{
    total_connections_--;
    ReleaseExternalFD();
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

bool PoolManager::Grant(const LeaseOwner &owner, Node &node, Connection &conn, TimestampTz now)
{
    Request *r = FindRequest(owner.request_key);
    return r != nullptr && r->OnGrant(owner.task, node, conn, now);
}

void PoolManager::LeaseReady(const LeaseOwner &owner, Node &node, Connection &conn,
                             TimestampTz now)
{
    if (Request *r = FindRequest(owner.request_key))
        r->OnReady(owner.task, node, conn, now);
}

void PoolManager::LeaseLost(const LeaseOwner &owner, const std::string &error, TimestampTz now)
{
    if (Request *r = FindRequest(owner.request_key))
        r->OnLost(owner.task, error, now);
}

void PoolManager::WaitFailed(const LeaseOwner &owner, int sqlerrcode, const std::string &error,
                             TimestampTz now)
{
    if (Request *r = FindRequest(owner.request_key))
        r->OnWaitFailed(owner.task, sqlerrcode, error, now);
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
            requests_[key] = std::make_unique<Request>(*this, i, key, now);
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
        it->second->Step(now);
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
    if (generation == loaded_generation_ && now < next_recheck_)
        return;

    Registry registry;
    try {
        registry = LoadRegistry();
    } catch (const Error &e) {
        Log(WARNING, Format("could not load the node registry: %s", e.message().c_str()));
        next_recheck_ = TimestampTzPlusMilliseconds(now, kRetryAfterErrorMs);
        return;
    }
    if (first_load_ || registry.extension_present != extension_present_)
        Log(LOG, registry.extension_present
                     ? Format("extension found in database \"%s\", managing its nodes",
                              peerpool_database)
                     : Format("extension not installed in database \"%s\", waiting for "
                              "CREATE EXTENSION pg_peerpool",
                              peerpool_database));
    first_load_ = false;
    extension_present_ = registry.extension_present;
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
            FreeNodeSlot(n.name);
        }
    }
    MirrorRegistry(registry, generation);

    SharedState &state = RequireShared();
    for (const NodeConfig &n : diff.added) {
        // LWLockAcquire errors only when too many LWLocks are held (never here).
        LWLockAcquire(state.lock, LW_SHARED);
        int slot = FindNodeSlot(state, n.name.c_str());
        LWLockRelease(state.lock);
        if (slot < 0)
            continue; // no free slot; MirrorRegistry warned
        nodes_[n.name] = std::make_unique<Node>(*this, n, slot, now, loaded_generation_ == 0);
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
        if (it != nodes_.end())
            it->second->StartDraining(now);
        else
            FreeNodeSlot(name);
    }
    configs_ = std::move(registry.nodes);
}

void PoolManager::RebuildWaitSetIfNeeded()
{
    std::vector<Registered> wanted;
    std::vector<Node::SocketInterest> interests;
    for (auto &[name, node] : nodes_) {
        interests.clear();
        node->CollectSockets(interests);
        for (const auto &i : interests)
            wanted.push_back({node.get(), i.conn_id, i.socket, i.events, i.epoch});
    }
    bool same = wait_set_ != nullptr && wanted.size() == registered_.size();
    for (size_t i = 0; same && i < wanted.size(); i++)
        same = wanted[i].node == registered_[i].node && wanted[i].conn_id == registered_[i].conn_id &&
               wanted[i].socket == registered_[i].socket && wanted[i].events == registered_[i].events &&
               wanted[i].epoch == registered_[i].epoch;
    if (same)
        return;

    registered_ = std::move(wanted);
    WaitEventSet *old = wait_set_;
    wait_set_ = nullptr;
    Registered *entries = registered_.data();
    size_t count = registered_.size();
    wait_set_ = pg::Call([&] {
        if (old != nullptr)
            FreeWaitEventSet(old);
        WaitEventSet *set = CreateWaitEventSet(TopMemoryContext, static_cast<int>(count) + 2);
        AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, nullptr);
        AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, nullptr, nullptr);
        for (size_t i = 0; i < count; i++)
            AddWaitEventToSet(set, entries[i].events, entries[i].socket, nullptr, &entries[i]);
        return set;
    });
}

long PoolManager::SleepMs(TimestampTz now) const
{
    TimestampTz wake = next_recheck_;
    for (const auto &[name, node] : nodes_) {
        TimestampTz t = node->NextWake();
        if (t != 0 && t < wake)
            wake = t;
    }
    for (const auto &[key, request] : requests_) {
        TimestampTz t = request->NextWake();
        if (t != 0 && t < wake)
            wake = t;
    }
    long ms = TimestampDifferenceMilliseconds(now, wake);
    if (wake > now && ms == 0)
        ms = 1; // round sub-millisecond waits up rather than spin
    return std::min(ms, kMaxSleepMs);
}

void PoolManager::DispatchEvents(const WaitEvent *fired, int count, TimestampTz now)
{
    for (int i = 0; i < count; i++) {
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
    TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), peerpool_drain_timeout);
    while (!requests_.empty() && GetCurrentTimestamp() < deadline) {
        TimestampTz now = GetCurrentTimestamp();
        ScanRequestSlots(now); // callers cancelled meanwhile get their queries cancelled
        for (auto &[name, node] : nodes_)
            node->Manage(now);
        StepRequests(now);
        if (requests_.empty())
            break;
        RebuildWaitSetIfNeeded();
        if (fired_.size() < registered_.size() + 2)
            fired_.resize(registered_.size() + 2);
        long timeout = std::max<long>(1, std::min<long>(SleepMs(now),
                                      TimestampDifferenceMilliseconds(now, deadline)));
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
        if (fired_.size() < registered_.size() + 2)
            fired_.resize(registered_.size() + 2);
        WaitEvent *events = fired_.data();
        int size = static_cast<int>(fired_.size());
        int n = pg::Call([&] {
            int got = WaitEventSetWait(wait_set_, 50, events, size, PG_WAIT_EXTENSION);
            ResetLatch(MyLatch);
            return got;
        });
        DispatchEvents(events, n, GetCurrentTimestamp());
        for (auto &[name, node] : nodes_)
            node->Manage(GetCurrentTimestamp());
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
    // A (re)started pool manager owns no connections: whatever a previous one published is
    // stale. The registry is mirrored again on the first pass.
    ClearNodeSlots();

    MemoryContext scratch = pg::Call([] {
        return AllocSetContextCreate(TopMemoryContext, "pg_peerpool loop scratch",
                                     ALLOCSET_DEFAULT_SIZES);
    });

    Log(LOG, Format("pool manager started (database \"%s\")", peerpool_database));
    fired_.resize(64);
    while (!shutdown_requested) {
        if (ConfigReloadPending) {
            ConfigReloadPending = false;
            pg::Call([] { ProcessConfigFile(PGC_SIGHUP); });
        }

        TimestampTz now = GetCurrentTimestamp();
        SyncRegistryIfNeeded(now);

        now = GetCurrentTimestamp();
        ScanRequestSlots(now);
        for (auto &[name, node] : nodes_)
            node->Manage(now);
        StepRequests(now);
        for (auto it = nodes_.begin(); it != nodes_.end();) {
            if (it->second->Drained()) {
                std::string name = it->first;
                it = nodes_.erase(it);
                FreeNodeSlot(name);
                Log(LOG, Format("node \"%s\" drained and removed", name.c_str()));
            } else {
                ++it;
            }
        }
        events_.Flush();

        RebuildWaitSetIfNeeded();
        if (fired_.size() < registered_.size() + 2)
            fired_.resize(registered_.size() + 2);
        long timeout = SleepMs(GetCurrentTimestamp());
        timeout = PublishHeartbeat(timeout); // for the views: at least one wake a second
        WaitEvent *events = fired_.data();
        int size = static_cast<int>(fired_.size());
        int nfired = pg::Call([&] {
            MemoryContextReset(scratch);
            int n = WaitEventSetWait(wait_set_, timeout, events, size, PG_WAIT_EXTENSION);
            ResetLatch(MyLatch);
            CHECK_FOR_INTERRUPTS();
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
