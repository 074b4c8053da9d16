// The pool manager background worker: registration, signals, and the event loop.
//
// One WaitEventSet over the latch and postmaster death. Committing backends bump
// SharedState::registry_generation and set our latch (see shmem.cpp), so a registry change is
// applied on the next wake, not on a timer. A slow safety-net recheck (kRecheckMs) catches what
// no trigger reports, such as DROP EXTENSION.
#include "pg_peerpool/worker/pool_manager.hpp"

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/shmem.hpp"
#include "pg_peerpool/worker/registry_sync.hpp"

extern "C" {
#include "postgres.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
}

namespace peerpool {

namespace {

constexpr long kRecheckMs = 10000;      // safety-net registry recheck
constexpr long kRetryAfterErrorMs = 1000; // after a failed registry load

// Set by our SIGTERM handler. We do not use die(): a graceful stop must let the loop drain and
// close its connections (SPEC section 7) instead of exiting from inside CHECK_FOR_INTERRUPTS.
volatile sig_atomic_t shutdown_requested = false;

void HandleSigterm(SIGNAL_ARGS)
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
    }
}

void Log(int level, const std::string &message)
{
    pg::Call([&] { ereport(level, (errmsg_internal("pg_peerpool: %s", message.c_str()))); });
}

class PoolManager {
public:
    void Run();

private:
    void SyncRegistryIfNeeded(TimestampTz now);

    std::vector<NodeConfig> nodes_;
    uint64 loaded_generation_ = 0;
    bool extension_present_ = false;
    TimestampTz next_recheck_ = 0;
};

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

    if (registry.extension_present != extension_present_)
        Log(LOG, registry.extension_present
                     ? Format("extension found in database \"%s\", managing its nodes",
                              peerpool_database)
                     : Format("extension not installed in database \"%s\", waiting for "
                              "CREATE EXTENSION pg_peerpool",
                              peerpool_database));
    extension_present_ = registry.extension_present;

    RegistryDiff diff = DiffRegistry(nodes_, registry.nodes);
    MirrorRegistry(registry, generation);
    for (const NodeConfig &n : diff.added)
        Log(LOG, Format("node \"%s\" registered", n.name.c_str()));
    for (const NodeConfig &n : diff.changed)
        Log(LOG, Format("node \"%s\" reconfigured", n.name.c_str()));
    for (const std::string &name : diff.removed)
        Log(LOG, Format("node \"%s\" removed", name.c_str()));

    nodes_ = std::move(registry.nodes);
    loaded_generation_ = generation;
    next_recheck_ = TimestampTzPlusMilliseconds(now, kRecheckMs);
}

void PoolManager::Run()
{
    SharedState &state = RequireShared();
    pg::Call([&] {
        before_shmem_exit(ForgetWorker, 0);
        LWLockAcquire(state.lock, LW_EXCLUSIVE);
        state.worker_pid = MyProcPid;
        LWLockRelease(state.lock);
        pg_atomic_write_u32(&state.worker_procno_plus1, static_cast<uint32>(MyProc->pgprocno) + 1);
    });

    WaitEventSet *events = pg::Call([] {
        WaitEventSet *set = CreateWaitEventSet(TopMemoryContext, 2);
        AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, nullptr);
        AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, nullptr, nullptr);
        return set;
    });

    Log(LOG, Format("pool manager started (database \"%s\")", peerpool_database));
    while (!shutdown_requested) {
        if (ConfigReloadPending) {
            ConfigReloadPending = false;
            pg::Call([] { ProcessConfigFile(PGC_SIGHUP); });
        }

        TimestampTz now = GetCurrentTimestamp();
        SyncRegistryIfNeeded(now);

        long timeout = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next_recheck_);
        WaitEvent fired[4];
        pg::Call([&] {
            WaitEventSetWait(events, timeout, fired, lengthof(fired), PG_WAIT_EXTENSION);
            ResetLatch(MyLatch);
            CHECK_FOR_INTERRUPTS();
        });
    }

    Log(LOG, "pool manager shutting down");
    pg::Call([&] { FreeWaitEventSet(events); });
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

    peerpool::PendingError pending;
    if (!peerpool::CatchAll([] { peerpool::PoolManager().Run(); }, pending))
        pending.Raise();
    proc_exit(0);
}
