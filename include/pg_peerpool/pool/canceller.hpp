// Query cancellation that never blocks the pool manager's event loop and works through
// poolers (SPEC sections 5 and 7).
//
// A remote query is cancelled the way psql and postgres_fdw do it: libpq's PQcancel() sends
// the protocol's CancelRequest (backend pid + secret key) on a new connection to the address
// the session is connected to. That reaches the right server process behind pgbouncer too,
// where PQbackendPID() is pgbouncer's cancel key and pg_cancel_backend() of it would hit
// nothing (or, worse, an unrelated process). It needs no free slot of the node's
// max_connections and no privilege on the node.
//
// PQcancel() blocks (connect, send, wait for the server to close), so each request runs on a
// short-lived thread that calls only PQcancel/PQfreeCancel (no PostgreSQL function, no palloc,
// no elog), created with every signal blocked, and reports through an eventfd that the loop's
// WaitEventSet watches. Threads are capped per node (kCancelThreadsPerGroup): a node that
// black-holes the cancel connection delays only its own cancels; the node gives up on a cancel
// after its own deadline and closes the session it was meant for.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

extern "C" {
#include "postgres.h"
#include "libpq-fe.h"
}

namespace peerpool {

constexpr int kCancelThreadsPerGroup = 4; // cancels in flight to one node; more wait their turn
constexpr int kCancelThreadsTotal = 64;   // and across the fleet (threads count in the
                                          // postmaster's task limits)

class Canceller {
public:
    Canceller();
    ~Canceller();
    Canceller(const Canceller &) = delete;
    Canceller &operator=(const Canceller &) = delete;

    int fd() const;
    bool enabled() const { return fd() >= 0; }

    // Sends `cancel` (owned from now on; freed by the thread) for `group` (the node's name).
    // Returns a token that Collect() reports back, or 0 if no cancel can be sent at all (then
    // `cancel` was freed).
    uint64 Start(const std::string &group, PGcancel *cancel);

    struct Result {
        std::string group;
        uint64 token;
        bool ok;
        std::string error;
    };
    // The cancels that finished (after fd() fired); starts queued ones.
    std::vector<Result> Collect();
    // The caller gave up on `token`: if it still waits for a thread, it is dropped unsent
    // (a running one cannot be stopped; its result is then ignored by its caller).
    void Forget(uint64 token);

    struct Shared; // what the threads share with the loop (canceller.cpp)

private:
    void Spawn(const std::string &group, uint64 token, PGcancel *cancel);
    void SpawnQueued(); // as many queued cancels as the caps allow, oldest group first

    std::shared_ptr<Shared> shared_;
    struct Queued {
        uint64 token;
        PGcancel *cancel;
    };
    std::map<std::string, std::deque<Queued>> queued_; // group -> cancels waiting for a thread
    std::map<std::string, int> running_;               // group -> threads in flight
    int running_total_ = 0;
    uint64 next_token_ = 1;
};

} // namespace peerpool
