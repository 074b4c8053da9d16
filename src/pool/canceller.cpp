// Query cancellation off the event loop (see include/pg_peerpool/pool/canceller.hpp).
//
// Threads here run libpq's PQcancel and PQfreeCancel only: no PostgreSQL function, no palloc,
// no elog. They are created with every signal blocked, so PostgreSQL's handlers only ever run
// on the main thread. The state they share with the loop is a heap object kept alive by
// shared_ptr, so a thread stuck in a slow connect when the pool manager exits touches nothing
// that was freed.
#include "pg_peerpool/pool/canceller.hpp"
#include "pg_peerpool/pool/quiet_thread.hpp"

#include <mutex>

#include <sys/eventfd.h>
#include <unistd.h>

namespace peerpool {

struct Canceller::Shared {
    std::mutex mutex;
    int fd = -1;
    std::vector<Canceller::Result> done; // under mutex
};

namespace {

void Report(const std::shared_ptr<Canceller::Shared> &shared, Canceller::Result result)
{
    std::lock_guard<std::mutex> guard(shared->mutex);
    shared->done.push_back(std::move(result));
    uint64_t one = 1;
    if (shared->fd >= 0)
        (void)!write(shared->fd, &one, sizeof(one));
}

// The body of a cancel thread: libpq calls only.
void RunCancel(std::shared_ptr<Canceller::Shared> shared, std::string group, uint64 token,
               PGcancel *cancel)
{
    char errbuf[256];
    errbuf[0] = '\0';
    bool ok = PQcancel(cancel, errbuf, sizeof(errbuf)) == 1;
    PQfreeCancel(cancel);
    std::string error = ok ? "" : errbuf;
    while (!error.empty() && (error.back() == '\n' || error.back() == ' '))
        error.pop_back();
    Report(shared, {std::move(group), token, ok, std::move(error)});
}

} // namespace

Canceller::Canceller() : shared_(std::make_shared<Shared>())
{
    // One descriptor for the whole process; closed with the process (a thread may still
    // write to it when the pool manager exits).
    shared_->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

Canceller::~Canceller()
{
    // Cancels that never got a thread are freed; running threads free their own.
    for (auto &[group, queue] : queued_)
        for (Queued &q : queue)
            PQfreeCancel(q.cancel);
}

int Canceller::fd() const { return shared_->fd; }

uint64 Canceller::Start(const std::string &group, PGcancel *cancel)
{
    if (cancel == nullptr)
        return 0;
    if (!enabled()) {
        PQfreeCancel(cancel);
        return 0;
    }
    uint64 token = next_token_++;
    auto running = running_.find(group);
    if ((running != running_.end() && running->second >= kCancelThreadsPerGroup) ||
        running_total_ >= kCancelThreadsTotal || queued_.count(group) != 0)
        queued_[group].push_back({token, cancel});
    else
        Spawn(group, token, cancel);
    return token;
}

void Canceller::Forget(uint64 token)
{
    for (auto it = queued_.begin(); it != queued_.end(); ++it) {
        auto &queue = it->second;
        for (auto q = queue.begin(); q != queue.end(); ++q)
            if (q->token == token) {
                PQfreeCancel(q->cancel);
                queue.erase(q);
                if (queue.empty())
                    queued_.erase(it);
                return;
            }
    }
}

void Canceller::SpawnQueued()
{
    bool spawned = true;
    while (spawned && running_total_ < kCancelThreadsTotal && !queued_.empty()) {
        spawned = false;
        for (auto it = queued_.begin();
             it != queued_.end() && running_total_ < kCancelThreadsTotal;) {
            auto running = running_.find(it->first);
            if (running != running_.end() && running->second >= kCancelThreadsPerGroup) {
                ++it;
                continue;
            }
            Queued next = it->second.front();
            it->second.pop_front();
            std::string group = it->first;
            it = it->second.empty() ? queued_.erase(it) : std::next(it);
            Spawn(group, next.token, next.cancel);
            spawned = true;
        }
    }
}

void Canceller::Spawn(const std::string &group, uint64 token, PGcancel *cancel)
{
    if (!StartQuietThread(RunCancel, shared_, group, token, cancel)) {
        // No thread to be had (resource limits): report the cancel as failed.
        PQfreeCancel(cancel);
        Report(shared_, {group, token, false, "could not start a thread to send the cancel"});
    }
    running_[group]++; // Collect() counts it back down
    running_total_++;
}

std::vector<Canceller::Result> Canceller::Collect()
{
    std::vector<Result> done;
    if (!enabled())
        return done;
    uint64_t count;
    while (read(shared_->fd, &count, sizeof(count)) > 0) {
    }
    {
        std::lock_guard<std::mutex> guard(shared_->mutex);
        done.swap(shared_->done);
    }
    for (const Result &r : done) {
        auto running = running_.find(r.group);
        if (running != running_.end() && --running->second <= 0)
            running_.erase(running);
        running_total_--;
    }
    SpawnQueued();
    return done;
}

} // namespace peerpool
