// The pool manager's heartbeat (see heartbeat.hpp and docs/monitoring.md).
#include "pg_peerpool/worker/heartbeat.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>

#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/shmem.hpp"

extern "C" {
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/spin.h"
#include "utils/timestamp.h"
}

namespace peerpool {

namespace {

bool registered = false; // this process published its start and registered ExitCallback

// before_shmem_exit: this pool manager is gone (SIGTERM, error exit). Nothing here can fail.
void ExitCallback(int, Datum)
{
    SharedState *state = Shared();
    if (state == nullptr)
        return;
    TimestampTz now = GetCurrentTimestamp();
    SpinLockAcquire(&state->manager.mutex);
    if (state->manager.pid == MyProcPid) {
        state->manager.pid = 0;
        state->manager.stopped_at = now;
    }
    SpinLockRelease(&state->manager.mutex);
}

} // namespace

long PublishHeartbeat(long sleep_ms)
{
    SharedState *state = Shared();
    if (state == nullptr)
        return sleep_ms;
    if (!registered) {
        // Only fails when the callback list is full; then the views see our exit by the pid.
        registered = true;
        try {
            pg::Call([] { before_shmem_exit(ExitCallback, 0); });
        } catch (const Error &) {
        }
    }
    TimestampTz now = GetCurrentTimestamp();
    SpinLockAcquire(&state->manager.mutex);
    if (state->manager.pid != MyProcPid) {
        state->manager.pid = MyProcPid;
        state->manager.started_at = MyStartTimestamp;
        state->manager.starts++;
    }
    state->manager.heartbeat = now;
    SpinLockRelease(&state->manager.mutex);
    return std::min(sleep_ms, kHeartbeatIntervalMs);
}

PoolManagerInfo ReadPoolManager(SharedState &shared)
{
    SpinLockAcquire(&shared.manager.mutex);
    PoolManagerStatus copy;
    copy.pid = shared.manager.pid;
    copy.started_at = shared.manager.started_at;
    copy.stopped_at = shared.manager.stopped_at;
    copy.heartbeat = shared.manager.heartbeat;
    copy.starts = shared.manager.starts;
    SpinLockRelease(&shared.manager.mutex);

    PoolManagerInfo info{};
    info.pid = static_cast<int>(copy.pid);
    info.started_at = copy.started_at;
    info.stopped_at = copy.stopped_at;
    info.heartbeat = copy.heartbeat;
    info.restarts = copy.starts > 0 ? static_cast<int>(copy.starts) - 1 : 0;
    TimestampTz now = GetCurrentTimestamp();
    info.heartbeat_age_ms = copy.heartbeat == 0
                                ? -1
                                : static_cast<double>(now - copy.heartbeat) / 1000.0;
    // A pool manager that died without its exit callback (it cannot, short of a crash, which
    // rebuilds shared memory) is recognised by its pid: kill(pid, 0) fails with ESRCH.
    if (copy.pid == 0 || (kill(copy.pid, 0) != 0 && errno == ESRCH)) {
        info.state = PoolManagerState::kStopped;
        info.pid = 0;
    } else if (info.heartbeat_age_ms > kHeartbeatStaleMs) {
        info.state = PoolManagerState::kNotResponding;
    } else {
        info.state = PoolManagerState::kRunning;
    }
    return info;
}

const char *PoolManagerStateName(PoolManagerState state)
{
    switch (state) {
    case PoolManagerState::kRunning:
        return "running";
    case PoolManagerState::kNotResponding:
        return "not responding";
    case PoolManagerState::kStopped:
        return "stopped";
    }
    return "unknown";
}

} // namespace peerpool
