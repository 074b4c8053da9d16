// Backend side of the request channel (see include/pg_peerpool/sql/channel.hpp and
// include/pg_peerpool/shmem.hpp, RequestSlot).
#include "pg_peerpool/sql/channel.hpp"

#include "pg_peerpool/pool/protocol.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/spin.h"
#include "utils/memutils.h"
}

namespace peerpool::channel {

namespace {

constexpr long kPollMs = 100; // how often a waiting backend checks the pool manager
constexpr long kSlotFreeTimeoutMs = 5000;
// The pool manager's own timeout answer normally arrives first; ours is the backstop.
constexpr long kDeadlineGraceMs = 50;

struct Current {
    bool active = false;
    RequestSlot *slot = nullptr;
    shm_mq_handle *send = nullptr;
    shm_mq_handle *recv = nullptr;
    uint32 worker_procno_plus1 = 0;
    uint32 generation = 0;
    int nest_level = 0; // transaction nesting level that submitted the request
    uint64 request_id = 0;
    // pool_query (one node, rows converted here): the call's own deadline, so a caller that
    // converts slowly still ends on time although the pool manager's verdict waits behind
    // the rows already queued. 0 = none (parallel_query answers per node).
    TimestampTz deadline = 0;
    int timeout_ms = 0;
};
Current current;
bool callbacks_registered = false;
// Owns the queue handles of the request in flight. Handles are released by resetting it, not
// by shm_mq_detach: a detach sets the other side's latch, and on the normal path that only
// costs the pool manager a wake-up. Loss of either side is signalled another way (the cancel
// flag, the pool manager's generation).
MemoryContext channel_context = nullptr;

void ReleaseHandles()
{
    current.send = current.recv = nullptr;
    if (channel_context != nullptr)
        MemoryContextReset(channel_context); // frees memory only; cannot error
}

// Never errors: runs from abort callbacks and at exit.
void Abandon()
{
    if (!current.active)
        return;
    current.active = false;
    SpinLockAcquire(&current.slot->mutex);
    current.slot->cancel = true;
    SpinLockRelease(&current.slot->mutex);
    ReleaseHandles();
    if (SharedState *state = Shared())
        pg_atomic_fetch_add_u64(&state->request_events, 1);
    WakePoolManager(); // it cancels the remote queries of this request
}

void XactCallback(XactEvent, void *) { Abandon(); }

// Only the abort of the subtransaction that submitted the request, or of one of its parents,
// ends the request: a subtransaction started and rolled back inside it (a PL/pgSQL exception
// block in a domain CHECK or an input function that converts the rows) leaves it running.
// The callback runs while the aborting subtransaction is still the current one.
void SubXactCallback(SubXactEvent event, SubTransactionId, SubTransactionId, void *)
{
    if (event == SUBXACT_EVENT_ABORT_SUB && current.active &&
        GetCurrentTransactionNestLevel() <= current.nest_level)
        Abandon();
}

void ExitCallback(int, Datum) { Abandon(); }

[[noreturn]] void WorkerGone()
{
    Abandon();
    ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE),
                    errmsg("the pg_peerpool pool manager stopped while running this request"),
                    errhint("It restarts automatically; retry the statement.")));
    pg_unreachable();
}

// Sleeps until our latch is set or kPollMs passed; honours interrupts.
void WaitForWorker()
{
    (void)WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, kPollMs,
                    PG_WAIT_EXTENSION);
    ResetLatch(MyLatch);
    CHECK_FOR_INTERRUPTS();
}

// The pool manager we submitted to has stopped or was replaced.
bool WorkerChanged()
{
    SharedState *state = Shared();
    return pg_atomic_read_u32(&state->worker_procno_plus1) != current.worker_procno_plus1 ||
           pg_atomic_read_u32(&state->worker_generation) != current.generation;
}

} // namespace

void Submit(const char *message, Size len)
{
    SharedState *state = Shared();
    if (state == nullptr || MyProc == nullptr)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pg_peerpool shared memory is not initialized"),
                        errhint("Add pg_peerpool to shared_preload_libraries and restart the "
                                "server.")));
    if (!callbacks_registered) {
        RegisterXactCallback(XactCallback, nullptr);
        RegisterSubXactCallback(SubXactCallback, nullptr);
        before_shmem_exit(ExitCallback, 0);
        callbacks_registered = true;
    }
    // One request per backend at a time: a call made while rows of another are being
    // converted (a domain CHECK or a type input function that calls pool_query) is refused;
    // the outer request goes on.
    if (current.active)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                        errmsg("pg_peerpool calls cannot be nested"),
                        errdetail("This session is still reading the result of another "
                                  "parallel_query, parallel_query_rows or pool_query call."),
                        errhint("Call it outside of functions that run while a result is "
                                "being converted, such as domain checks and type input "
                                "functions.")));

    uint32 procno_plus1 = pg_atomic_read_u32(&state->worker_procno_plus1);
    if (procno_plus1 == 0)
        ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE),
                        errmsg("the pg_peerpool pool manager is not running"),
                        errhint("It restarts automatically within seconds after a crash or "
                                "termination; check the server log.")));

    RequestSlot *slot = GetRequestSlot(MyProc->pgprocno);
    // The slot is busy only while the pool manager still cleans up an abandoned request.
    TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), kSlotFreeTimeoutMs);
    for (;;) {
        SpinLockAcquire(&slot->mutex);
        bool is_free = slot->state == REQUEST_SLOT_FREE;
        SpinLockRelease(&slot->mutex);
        if (is_free)
            break;
        if (GetCurrentTimestamp() >= deadline)
            ereport(ERROR, (errcode(ERRCODE_OBJECT_IN_USE),
                            errmsg("the previous pg_peerpool request of this session is still "
                                   "being cancelled")));
        pg_atomic_fetch_add_u64(&state->request_events, 1);
        WakePoolManager();
        (void)WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10,
                        PG_WAIT_EXTENSION);
        ResetLatch(MyLatch);
        CHECK_FOR_INTERRUPTS();
    }

    PGPROC *worker = &ProcGlobal->allProcs[procno_plus1 - 1];
    shm_mq *request_queue = shm_mq_create(SlotRequestQueue(slot), kRequestQueueSize);
    shm_mq_set_sender(request_queue, MyProc);
    shm_mq_set_receiver(request_queue, worker);
    shm_mq *response_queue = shm_mq_create(SlotResponseQueue(slot), kResponseQueueSize);
    shm_mq_set_sender(response_queue, worker);
    shm_mq_set_receiver(response_queue, MyProc);

    if (channel_context == nullptr)
        channel_context = AllocSetContextCreate(TopMemoryContext, "pg_peerpool channel",
                                                ALLOCSET_SMALL_SIZES);
    MemoryContext old = MemoryContextSwitchTo(channel_context);
    current.send = shm_mq_attach(request_queue, nullptr, nullptr);
    current.recv = shm_mq_attach(response_queue, nullptr, nullptr);
    MemoryContextSwitchTo(old);
    current.slot = slot;
    current.worker_procno_plus1 = procno_plus1;
    current.generation = pg_atomic_read_u32(&state->worker_generation);
    current.nest_level = GetCurrentTransactionNestLevel();
    current.deadline = 0;
    protocol::RequestKind kind;
    int32 timeout_ms = 0;
    if (protocol::PeekRequestHeader(message, len, kind, timeout_ms) &&
        kind != protocol::REQUEST_KIND_PARALLEL && timeout_ms > 0) {
        current.timeout_ms = timeout_ms;
        current.deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
                                                       static_cast<int64>(timeout_ms) +
                                                           kDeadlineGraceMs);
    }
    current.active = true;

    SpinLockAcquire(&slot->mutex);
    slot->state = REQUEST_SLOT_SUBMITTED;
    slot->cancel = false;
    slot->worker_generation = current.generation;
    slot->request_id++;
    current.request_id = slot->request_id;
    slot->backend_pid = MyProcPid;
    SpinLockRelease(&slot->mutex);
    pg_atomic_fetch_add_u64(&state->request_events, 1);

    // The send publishes the request and sets the pool manager's latch (force_flush).
    for (;;) {
        shm_mq_result r = shm_mq_send(current.send, len, message, true, true);
        if (r == SHM_MQ_SUCCESS)
            break;
        if (r == SHM_MQ_DETACHED || WorkerChanged())
            WorkerGone();
        WaitForWorker();
    }
}

// The slot was freed (or reused) by the pool manager while we still wait for answers.
static bool SlotReleased()
{
    SpinLockAcquire(&current.slot->mutex);
    bool released = current.slot->state == REQUEST_SLOT_FREE ||
                    current.slot->request_id != current.request_id;
    SpinLockRelease(&current.slot->mutex);
    return released;
}

[[noreturn]] static void DeadlinePassed()
{
    int timeout_ms = current.timeout_ms;
    Abandon(); // the pool manager cancels the remote query
    ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
                    errmsg("timeout: the call did not complete within %d ms", timeout_ms)));
    pg_unreachable();
}

void Receive(Size *len, const char **data)
{
    if (!current.active)
        ereport(ERROR,
                (errcode(ERRCODE_QUERY_CANCELED), errmsg("the pg_peerpool request was abandoned"),
                 errdetail("The subtransaction that started it was rolled back.")));
    for (;;) {
        void *raw = nullptr;
        // A caller converting rows slowly (a domain CHECK, say) always has rows waiting: the
        // deadline is checked between messages too, not only when the queue is empty.
        if (current.deadline != 0 && GetCurrentTimestamp() >= current.deadline)
            DeadlinePassed();
        shm_mq_result r = shm_mq_receive(current.recv, len, &raw, true);
        if (r == SHM_MQ_SUCCESS) {
            *data = static_cast<const char *>(raw);
            return;
        }
        // Only an empty queue tells: what the pool manager sent before it left is still read.
        if (r == SHM_MQ_DETACHED || WorkerChanged())
            WorkerGone();
        if (SlotReleased()) {
            // Freed without an end marker: the pool manager failed this request and could
            // not tell us (see Request::FailInternal). Read once more: the slot is released
            // after the last message is in the queue.
            r = shm_mq_receive(current.recv, len, &raw, true);
            if (r == SHM_MQ_SUCCESS) {
                *data = static_cast<const char *>(raw);
                return;
            }
            Abandon();
            ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR),
                            errmsg("the pg_peerpool pool manager dropped this request"),
                            errhint("The server log of the pool manager says why.")));
        }
        if (current.deadline != 0 && GetCurrentTimestamp() >= current.deadline)
            DeadlinePassed();
        WaitForWorker();
    }
}

void Finish()
{
    if (!current.active)
        return;
    current.active = false;
    ReleaseHandles(); // the pool manager frees the slot once it is done with it
}

} // namespace peerpool::channel
