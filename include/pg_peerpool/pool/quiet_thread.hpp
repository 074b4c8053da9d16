// Short-lived helper threads of the pool manager (name lookups, cancel requests).
//
// Such a thread runs plain C library or libpq code only: no PostgreSQL function, no palloc, no
// elog. It is created with every signal blocked (it inherits the mask), so PostgreSQL's
// handlers (latch, SIGTERM, SIGHUP, SIGINT) only ever run on the main thread.
#pragma once

#include <signal.h>

#include <thread>
#include <utility>

namespace peerpool {

// Starts `fn(args...)` on a detached thread with every signal blocked. Returns false if no
// thread could be started (resource limits); `fn` then did not run.
template <typename Fn, typename... Args> bool StartQuietThread(Fn &&fn, Args &&...args)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    bool started = true;
    try {
        std::thread(std::forward<Fn>(fn), std::forward<Args>(args)...).detach();
    } catch (...) {
        started = false;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return started;
}

} // namespace peerpool
