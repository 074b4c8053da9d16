// Shared memory sizing, allocation and the small helpers every process uses to reach it.
#include "pg_peerpool/shmem.hpp"

#include <algorithm>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
}

namespace peerpool {

static SharedState *shared = nullptr;
static shmem_startup_hook_type prev_shmem_startup_hook = nullptr;
static shmem_request_hook_type prev_shmem_request_hook = nullptr;

static const char *kTrancheName = "pg_peerpool";
static char *request_slots = nullptr;
static int num_request_slots = 0;

static Size RequestSlotStride()
{
    return MAXALIGN(sizeof(RequestSlot)) + kRequestQueueSize + kResponseQueueSize;
}

// Backends and background workers have PGPROC numbers below MaxBackends, which is computed
// before shmem_request_hook runs.
static int RequestSlotCount() { return MaxBackends; }

static Size RequestSlotsSize()
{
    return mul_size(RequestSlotStride(), static_cast<Size>(RequestSlotCount()));
}

static Size SharedSize()
{
    Size size = offsetof(SharedState, nodes);
    return add_size(size, mul_size(sizeof(NodeSlot), static_cast<Size>(peerpool_max_nodes)));
}

static void RequestShmem()
{
    RequestAddinShmemSpace(SharedSize());
    RequestAddinShmemSpace(RequestSlotsSize());
    RequestNamedLWLockTranche(kTrancheName, 1);
}

static void ShmemRequest()
{
    if (prev_shmem_request_hook)
        prev_shmem_request_hook();
    RequestShmem();
}

// Runs in the postmaster at startup and after every crash-restart (shared memory is rebuilt,
// so the node table starts empty and the pool manager reloads it from the catalog).
static void ShmemStartup()
{
    if (prev_shmem_startup_hook)
        prev_shmem_startup_hook();

    LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
    bool found = false;
    shared = static_cast<SharedState *>(ShmemInitStruct("pg_peerpool", SharedSize(), &found));
    if (!found) {
        memset(static_cast<void *>(shared), 0, SharedSize());
        shared->lock = &(GetNamedLWLockTranche(kTrancheName))->lock;
        pg_atomic_init_u64(&shared->registry_generation, 1);
        pg_atomic_init_u32(&shared->worker_procno_plus1, 0);
        ConditionVariableInit(&shared->check_cv);
        for (int i = 0; i < peerpool_max_nodes; i++)
            InitNodeSlot(shared->nodes[i]);
        shared->loaded_generation = 0;
        shared->max_nodes = peerpool_max_nodes;
        pg_atomic_init_u32(&shared->worker_generation, 0);
        pg_atomic_init_u64(&shared->request_events, 0);
        pg_atomic_init_u64(&shared->check_requests, 0);
        SpinLockInit(&shared->manager.mutex);
    }
    request_slots = static_cast<char *>(
        ShmemInitStruct("pg_peerpool requests", RequestSlotsSize(), &found));
    num_request_slots = RequestSlotCount();
    if (!found) {
        for (int i = 0; i < num_request_slots; i++) {
            RequestSlot *slot = GetRequestSlot(i);
            memset(static_cast<void *>(slot), 0, sizeof(RequestSlot));
            SpinLockInit(&slot->mutex);
            slot->state = REQUEST_SLOT_FREE;
        }
    }
    LWLockRelease(AddinShmemInitLock);
}

void InstallShmemHooks()
{
    prev_shmem_request_hook = shmem_request_hook;
    shmem_request_hook = ShmemRequest;
    prev_shmem_startup_hook = shmem_startup_hook;
    shmem_startup_hook = ShmemStartup;
}

SharedState *Shared() { return shared; }

void CopyClipped(char *dst, size_t size, const std::string &src)
{
    size_t n = std::min(src.size(), size - 1);
    // Never end inside a multibyte character (continuation bytes are 10xxxxxx).
    if (n < src.size())
        while (n > 0 && (static_cast<unsigned char>(src[n]) & 0xC0) == 0x80)
            n--;
    memcpy(dst, src.data(), n);
    dst[n] = '\0';
}

int NumRequestSlots() { return num_request_slots; }

RequestSlot *GetRequestSlot(int index)
{
    return reinterpret_cast<RequestSlot *>(request_slots + RequestSlotStride() * index);
}

shm_mq *SlotRequestQueue(RequestSlot *slot)
{
    return reinterpret_cast<shm_mq *>(reinterpret_cast<char *>(slot) +
                                      MAXALIGN(sizeof(RequestSlot)));
}

shm_mq *SlotResponseQueue(RequestSlot *slot)
{
    return reinterpret_cast<shm_mq *>(reinterpret_cast<char *>(slot) +
                                      MAXALIGN(sizeof(RequestSlot)) + kRequestQueueSize);
}

void InitNodeSlot(NodeSlot &slot)
{
    memset(static_cast<void *>(&slot), 0, sizeof(slot));
    slot.latency_ms = -1;
    slot.replication_lag_ms = -1;
    slot.detected_role = NODE_ROLE_UNKNOWN;
    for (pg_atomic_uint32 *g : {&slot.total, &slot.active, &slot.idle, &slot.waiting})
        pg_atomic_init_u32(g, 0);
    for (pg_atomic_uint64 *c : {&slot.created, &slot.closed, &slot.recycled, &slot.acquires,
                                &slot.acquire_timeouts, &slot.queries, &slot.errors,
                                &slot.query_time_us, &slot.check_requested, &slot.check_completed})
        pg_atomic_init_u64(c, 0);
}

int FindNodeSlot(const SharedState &state, const char *name)
{
    for (int i = 0; i < state.max_nodes; i++)
        if (state.nodes[i].in_use && strcmp(state.nodes[i].name, name) == 0)
            return i;
    return -1;
}

SharedState &RequireShared()
{
    if (shared == nullptr)
        throw Error(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "pg_peerpool shared memory is not initialized", "",
                    "Add pg_peerpool to shared_preload_libraries and restart the server.");
    return *shared;
}

void WakePoolManager()
{
    if (shared == nullptr)
        return;
    uint32 procno_plus1 = pg_atomic_read_u32(&shared->worker_procno_plus1);
    // A stale number can only wake an unrelated process spuriously, which latches tolerate.
    if (procno_plus1 != 0 && procno_plus1 <= ProcGlobal->allProcCount)
        SetLatch(&ProcGlobal->allProcs[procno_plus1 - 1].procLatch);
}

const char *NodeStateName(NodeState state)
{
    switch (state) {
    case NODE_STATE_DISCONNECTED:
        return "disconnected";
    case NODE_STATE_CONNECTING:
        return "connecting";
    case NODE_STATE_HEALTHY:
        return "healthy";
    case NODE_STATE_DEGRADED:
        return "degraded";
    case NODE_STATE_UNHEALTHY:
        return "unhealthy";
    case NODE_STATE_RECONNECTING:
        return "reconnecting";
    case NODE_STATE_TRANSITIONING:
        return "transitioning";
    case NODE_STATE_DRAINING:
        return "draining";
    }
    return "unknown";
}

const char *NodeRoleName(NodeRole role)
{
    switch (role) {
    case NODE_ROLE_AUTO:
        return "auto";
    case NODE_ROLE_PRIMARY:
        return "primary";
    case NODE_ROLE_STANDBY:
        return "standby";
    case NODE_ROLE_UNKNOWN:
        return "unknown";
    }
    return "unknown";
}

} // namespace peerpool

extern "C" {
#include "access/xact.h"
}

namespace peerpool {

// Set when this transaction changed peerpool.node; acted on at commit, dropped at abort.
static bool registry_changed_in_xact = false;

void MarkRegistryChangedAtCommit() { registry_changed_in_xact = true; }

// XACT_EVENT_COMMIT runs after the commit is visible to new snapshots, so the woken pool
// manager is sure to read the new rows. Nothing here can error.
static void RegistryXactCallback(XactEvent event, void *)
{
    switch (event) {
    case XACT_EVENT_COMMIT:
    case XACT_EVENT_PARALLEL_COMMIT:
        if (registry_changed_in_xact && shared != nullptr) {
            pg_atomic_fetch_add_u64(&shared->registry_generation, 1);
            WakePoolManager();
        }
        registry_changed_in_xact = false;
        break;
    case XACT_EVENT_PREPARE:
        // The change becomes visible at COMMIT PREPARED, in another session that runs none of
        // our code: the pool manager's periodic recheck (10 s) applies it.
    case XACT_EVENT_ABORT:
    case XACT_EVENT_PARALLEL_ABORT:
        registry_changed_in_xact = false;
        break;
    default:
        break;
    }
}

void RegisterRegistryXactCallback() { RegisterXactCallback(RegistryXactCallback, nullptr); }

} // namespace peerpool
