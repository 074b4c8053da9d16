// Routing for pool_query: candidates by target, then the load-balancing strategy.
#include "pg_peerpool/pool/routing.hpp"

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "common/pg_prng.h"
}

namespace peerpool {

std::string WhyNotServing(const Node &node, bool write)
{
    if (!node.config().enabled)
        return "disabled";
    switch (node.state()) {
    case NODE_STATE_HEALTHY:
        return write && node.read_only() ? "read-only (default_transaction_read_only is on)" : "";
    case NODE_STATE_DEGRADED:
        return write ? "degraded (serves reads only)" : "";
    case NODE_STATE_TRANSITIONING:
        return "transitioning (a role change is being confirmed)";
    case NODE_STATE_UNHEALTHY:
    case NODE_STATE_RECONNECTING:
        return Format("%s%s%s", NodeStateName(node.state()), node.last_error().empty() ? "" : ": ",
                      node.last_error().c_str());
    default:
        return NodeStateName(node.state());
    }
}

namespace {

Node *Pick(const std::vector<Node *> &candidates, uint64 &round_robin)
{
    size_t n = candidates.size();
    size_t rr = static_cast<size_t>(round_robin++ % n);
    switch (peerpool_load_balance) {
    case LOAD_BALANCE_LEAST_CONNECTIONS: {
        // Fewest busy connections; ties broken round-robin so equal nodes share the load.
        Node *best = nullptr;
        for (size_t k = 0; k < n; k++) {
            Node *c = candidates[(rr + k) % n];
            if (best == nullptr || c->busy_connections() < best->busy_connections())
                best = c;
        }
        return best;
    }
    case LOAD_BALANCE_LATENCY: {
        Node *best = nullptr;
        for (size_t k = 0; k < n; k++) {
            Node *c = candidates[(rr + k) % n];
            double l = c->latency_ms() < 0 ? 1e12 : c->latency_ms();
            double b = best == nullptr ? 0 : (best->latency_ms() < 0 ? 1e12 : best->latency_ms());
            if (best == nullptr || l < b)
                best = c;
        }
        return best;
    }
    case LOAD_BALANCE_WEIGHTED: {
        double total = 0;
        for (Node *c : candidates)
            total += c->config().weight;
        if (total <= 0)
            return candidates[rr];
        double r = pg_prng_double(&pg_global_prng_state) * total;
        for (Node *c : candidates) {
            r -= c->config().weight;
            if (r < 0)
                return c;
        }
        return candidates.back();
    }
    case LOAD_BALANCE_RANDOM:
        return candidates[static_cast<size_t>(
            pg_prng_uint64_range(&pg_global_prng_state, 0, n - 1))];
    case LOAD_BALANCE_ROUND_ROBIN:
    default:
        return candidates[rr];
    }
}

} // namespace

RouteResult RouteQuery(const std::string &target, const std::vector<Node *> &nodes,
                       uint64 &round_robin)
{
    RouteResult out;
    bool is_kind = target == "read" || target == "write" || target == "standby";
    if (!is_kind) {
        for (Node *n : nodes)
            if (n->name() == target) {
                std::string why = WhyNotServing(*n, false);
                if (!why.empty()) {
                    out.sqlerrcode = ERRCODE_CONNECTION_FAILURE;
                    out.message = Format("node \"%s\" cannot serve queries", target.c_str());
                    out.detail = Format("%s: %s.", target.c_str(), why.c_str());
                    return out;
                }
                out.node = n;
                return out;
            }
        out.sqlerrcode = ERRCODE_UNDEFINED_OBJECT;
        out.message = Format("node \"%s\" does not exist", target.c_str());
        out.detail = "The target must be \"read\", \"write\", \"standby\" or a node name.";
        return out;
    }

    bool write = target == "write";
    std::vector<Node *> primaries, standbys;
    std::string reasons;
    for (Node *n : nodes) {
        std::string why = WhyNotServing(*n, write);
        NodeRole role = n->EffectiveRole();
        if (why.empty() && write && role != NODE_ROLE_PRIMARY)
            why = Format("%s, not primary", NodeRoleName(role));
        if (why.empty() && target == "standby" && role != NODE_ROLE_STANDBY)
            why = Format("%s, not standby", NodeRoleName(role));
        if (!why.empty()) {
            reasons += Format("%s%s: %s", reasons.empty() ? "" : "; ", n->name().c_str(),
                              why.c_str());
            continue;
        }
        (role == NODE_ROLE_STANDBY ? standbys : primaries).push_back(n);
    }
    std::vector<Node *> candidates;
    if (write)
        candidates = primaries;
    else if (target == "standby")
        candidates = standbys;
    else if (peerpool_read_write_split && !standbys.empty())
        candidates = standbys; // reads prefer standbys, keeping the primary for writes
    else {
        candidates = primaries;
        candidates.insert(candidates.end(), standbys.begin(), standbys.end());
    }
    if (candidates.empty()) {
        out.sqlerrcode = ERRCODE_CONNECTION_FAILURE;
        out.message = Format("no node can serve target \"%s\"", target.c_str());
        out.detail = nodes.empty() ? "No nodes are registered." : Format("%s.", reasons.c_str());
        return out;
    }
    out.node = Pick(candidates, round_robin);
    return out;
}

} // namespace peerpool
