// Asynchronous host name resolution for the pool manager (see
// include/pg_peerpool/pool/resolver.hpp).
//
// Threads here run plain C library code only (getaddrinfo, getnameinfo, malloc through the C++
// library): no PostgreSQL function, no palloc, no elog. They are created with every signal
// blocked, so PostgreSQL's handlers (latch, SIGTERM, SIGHUP) only ever run on the main thread.
// The state they share with the loop is a heap object kept alive by shared_ptr, so a thread
// stuck in a slow lookup when the pool manager exits touches nothing that was freed.
#include "pg_peerpool/pool/resolver.hpp"
#include "pg_peerpool/pool/quiet_thread.hpp"

#include <algorithm>
#include <mutex>
#include <thread>

#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

extern "C" {
#include "utils/timestamp.h"
}

namespace peerpool {

struct Resolver::Shared {
    std::mutex mutex;
    int fd = -1;
    struct Done {
        std::string host;
        std::vector<std::string> addresses;
        std::string error;
    };
    std::vector<Done> done; // under mutex
};

struct Resolver::Entry {
    std::string host;
    std::vector<std::string> addresses; // numeric, in getaddrinfo order
    std::string error;                  // the last lookup failed
    bool ok = false;                    // addresses valid (maybe expired)
    bool in_flight = false;
    TimestampTz expires = 0;
};

namespace {

bool IsNumericAddress(const std::string &host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host.c_str(), buf) == 1 ||
           inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

bool IsSocketPath(const std::string &host)
{
    return host.empty() || host[0] == '/' || host[0] == '@';
}

std::vector<std::string> SplitList(const std::string &s)
{
    std::vector<std::string> out;
    size_t start = 0;
    for (;;) {
        size_t comma = s.find(',', start);
        out.push_back(
            s.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (comma == std::string::npos)
            break;
        start = comma + 1;
    }
    return out;
}

std::string JoinList(const std::vector<std::string> &items)
{
    std::string out;
    for (size_t i = 0; i < items.size(); i++)
        out += (i ? "," : "") + items[i];
    return out;
}

// The body of a lookup thread: C library calls only.
void RunLookup(std::shared_ptr<Resolver::Shared> shared, std::string host)
{
    Resolver::Shared::Done done;
    done.host = host;
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo *result = nullptr;
    int rc = getaddrinfo(host.c_str(), nullptr, &hints, &result);
    if (rc != 0) {
        done.error = "could not translate host name \"" + host +
                     "\" to address: " + std::string(gai_strerror(rc));
    } else {
        for (struct addrinfo *a = result; a != nullptr; a = a->ai_next) {
            char text[NI_MAXHOST];
            if (getnameinfo(a->ai_addr, a->ai_addrlen, text, sizeof(text), nullptr, 0,
                            NI_NUMERICHOST) == 0 &&
                std::find(done.addresses.begin(), done.addresses.end(), text) ==
                    done.addresses.end())
                done.addresses.emplace_back(text);
        }
        freeaddrinfo(result);
        if (done.addresses.empty())
            done.error = "host name \"" + host + "\" has no address";
    }
    std::lock_guard<std::mutex> guard(shared->mutex);
    shared->done.push_back(std::move(done));
    uint64_t one = 1;
    if (shared->fd >= 0)
        (void)!write(shared->fd, &one, sizeof(one));
}

} // namespace

Resolver::Resolver() : shared_(std::make_shared<Shared>())
{
    // One descriptor for the whole process; it stays open as long as the pool manager lives
    // (closed with the process: a thread may still write to it).
    shared_->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

Resolver::~Resolver() = default;

int Resolver::fd() const { return shared_->fd; }

void Resolver::StartLookup(const std::string &host)
{
    if (running_ >= kResolverMaxThreads) {
        if (std::find(queued_.begin(), queued_.end(), host) == queued_.end())
            queued_.push_back(host);
        return;
    }
    if (!StartQuietThread(RunLookup, shared_, host)) {
        // No thread to be had (resource limits): remember the failure like a lookup error.
        std::lock_guard<std::mutex> guard(shared_->mutex);
        shared_->done.push_back({host, {}, "could not start a name lookup thread"});
        uint64_t one = 1;
        (void)!write(shared_->fd, &one, sizeof(one));
    }
    running_++; // Collect() counts it back down
}

ResolveStatus Resolver::Lookup(const std::string &host, TimestampTz now,
                               std::vector<std::string> &addresses, std::string &error)
{
    auto it = std::find_if(entries_.begin(), entries_.end(),
                           [&](const auto &e) { return e->host == host; });
    Entry *e = nullptr;
    if (it == entries_.end()) {
        entries_.push_back(std::make_unique<Entry>());
        e = entries_.back().get();
        e->host = host;
    } else {
        e = it->get();
    }
    bool fresh = e->expires != 0 && now < e->expires;
    if (!fresh && !e->in_flight) {
        e->in_flight = true;
        StartLookup(host);
    }
    if (e->ok) {
        addresses = e->addresses; // possibly expired: used while the refresh runs
        return RESOLVE_READY;
    }
    if (fresh && !e->error.empty()) {
        error = e->error;
        return RESOLVE_FAILED;
    }
    return RESOLVE_PENDING;
}

bool Resolver::Collect(TimestampTz now)
{
    if (!enabled())
        return false;
    uint64_t count;
    while (read(shared_->fd, &count, sizeof(count)) > 0) {
    }
    std::vector<Shared::Done> done;
    {
        std::lock_guard<std::mutex> guard(shared_->mutex);
        done.swap(shared_->done);
    }
    for (Shared::Done &d : done) {
        running_--;
        for (auto &e : entries_) {
            if (e->host != d.host)
                continue;
            e->in_flight = false;
            if (d.error.empty()) {
                e->ok = true;
                e->addresses = std::move(d.addresses);
                e->error.clear();
                e->expires = TimestampTzPlusMilliseconds(now, kResolverTtlMs);
            } else if (!e->ok) {
                // A failed refresh keeps the last good answer; a first failure is remembered
                // briefly so that the connection waiting for it fails.
                e->error = d.error;
                e->expires = TimestampTzPlusMilliseconds(now, kResolverFailureTtlMs);
            } else {
                e->expires = TimestampTzPlusMilliseconds(now, kResolverFailureTtlMs);
            }
        }
    }
    while (running_ < kResolverMaxThreads && !queued_.empty()) {
        std::string host = queued_.front();
        queued_.erase(queued_.begin());
        StartLookup(host);
    }
    return !done.empty();
}

ResolveStatus Resolver::Resolve(ConnOptions &options, TimestampTz now, std::string &error)
{
    if (!enabled())
        return RESOLVE_READY; // libpq resolves (blocking); only if no eventfd could be made
    auto find = [&](const char *key) {
        return std::find_if(options.begin(), options.end(),
                            [&](const auto &kv) { return kv.first == key; });
    };
    auto host_opt = find("host");
    auto hostaddr_opt = find("hostaddr");
    if (host_opt == options.end() ||
        (hostaddr_opt != options.end() && !hostaddr_opt->second.empty()))
        return RESOLVE_READY; // no names, or the conninfo gives the addresses itself
    std::vector<std::string> hosts = SplitList(host_opt->second);
    auto port_opt = find("port");
    std::vector<std::string> ports;
    if (port_opt != options.end())
        ports = SplitList(port_opt->second);
    if (ports.size() > 1 && ports.size() != hosts.size())
        return RESOLVE_READY; // libpq reports the mismatch itself

    std::vector<std::string> out_hosts, out_addrs, out_ports;
    bool pending = false, any_name = false;
    std::string first_error;
    for (size_t i = 0; i < hosts.size(); i++) {
        const std::string &h = hosts[i];
        std::string port = ports.empty() ? "" : ports[ports.size() == 1 ? 0 : i];
        if (IsSocketPath(h) || IsNumericAddress(h)) {
            out_hosts.push_back(h);
            out_addrs.push_back(IsSocketPath(h) ? "" : h);
            out_ports.push_back(port);
            continue;
        }
        any_name = true;
        std::vector<std::string> addresses;
        std::string why;
        switch (Lookup(h, now, addresses, why)) {
        case RESOLVE_PENDING:
            pending = true;
            break;
        case RESOLVE_FAILED:
            if (first_error.empty())
                first_error = why; // libpq too skips a host it cannot resolve
            break;
        case RESOLVE_READY:
            for (const std::string &a : addresses) {
                out_hosts.push_back(h);
                out_addrs.push_back(a);
                out_ports.push_back(port);
            }
            break;
        }
    }
    if (pending)
        return RESOLVE_PENDING;
    if (!any_name)
        return RESOLVE_READY;
    if (out_hosts.empty()) {
        error = first_error;
        return RESOLVE_FAILED;
    }
    host_opt->second = JoinList(out_hosts);
    if (hostaddr_opt != options.end())
        hostaddr_opt->second = JoinList(out_addrs);
    else
        options.emplace_back("hostaddr", JoinList(out_addrs));
    port_opt = find("port");
    if (port_opt != options.end())
        port_opt->second = JoinList(out_ports);
    return RESOLVE_READY;
}

} // namespace peerpool
