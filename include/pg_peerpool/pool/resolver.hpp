// Host name resolution that never blocks the pool manager's event loop (SPEC section 7).
//
// libpq resolves host names with a blocking getaddrinfo() inside PQconnectStartParams and
// PQconnectPoll: one slow name server would stall every node. Instead the pool manager
// resolves each name itself, on a short-lived thread per lookup, and hands libpq the numbers
// as `hostaddr` next to the unchanged `host` (so verify-full, SNI and the password file still
// see the name). The threads touch no PostgreSQL state: they call getaddrinfo, store the answer
// under a mutex, and write to an eventfd that the loop's WaitEventSet watches.
//
// Answers are cached for kResolverTtlMs; an expired answer is still used while a refresh runs
// in the background (a slow resolver then delays nothing). Failures are remembered for
// kResolverFailureTtlMs, so the connection waiting for them sees them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "pg_peerpool/pool/conninfo.hpp"

extern "C" {
#include "postgres.h"
#include "datatype/timestamp.h"
}

namespace peerpool {

constexpr long kResolverTtlMs = 60000;
constexpr long kResolverFailureTtlMs = 1000;
constexpr int kResolverMaxThreads = 16; // lookups in flight at once; more wait their turn

enum ResolveStatus { RESOLVE_READY, RESOLVE_PENDING, RESOLVE_FAILED };

class Resolver {
public:
    Resolver();
    ~Resolver();
    Resolver(const Resolver &) = delete;
    Resolver &operator=(const Resolver &) = delete;

    // The descriptor that becomes readable when lookups finish (-1 if it could not be made:
    // then names are left to libpq, which resolves them itself).
    int fd() const;
    bool enabled() const { return fd() >= 0; }

    // Rewrites `options` so that libpq needs no name lookup: every host name gets its
    // addresses as hostaddr entries (one host entry per address, ports repeated). Unix
    // sockets, numeric addresses and conninfos that set hostaddr themselves are left alone.
    // RESOLVE_PENDING: a lookup is under way, call again after Collect(). RESOLVE_FAILED: no
    // host could be resolved; `error` says why.
    ResolveStatus Resolve(ConnOptions &options, TimestampTz now, std::string &error);

    // Takes the answers of finished lookups (after fd() fired). Returns true if any arrived.
    bool Collect(TimestampTz now);

    struct Shared; // what lookup threads share with the loop (resolver.cpp)

private:
    struct Entry;
    ResolveStatus Lookup(const std::string &host, TimestampTz now,
                         std::vector<std::string> &addresses, std::string &error);
    void StartLookup(const std::string &host);
    std::shared_ptr<Shared> shared_;
    std::vector<std::unique_ptr<Entry>> entries_;
    std::vector<std::string> queued_; // waiting for a free thread
    int running_ = 0;
};

} // namespace peerpool
