// Choosing the node for pool_query (SPEC section 5): the target decides the candidates,
// peerpool.load_balance picks among them.
#pragma once

#include <string>
#include <vector>

#include "pg_peerpool/pool/node.hpp"

namespace peerpool {

struct RouteResult {
    Node *node = nullptr; // chosen node, or nullptr with the error below
    int sqlerrcode = 0;
    std::string message;
    std::string detail;
};

// `nodes` are every registered node (any state), sorted by name. `round_robin` is the pool
// manager's counter, advanced on every pick.
RouteResult RouteQuery(const std::string &target, const std::vector<Node *> &nodes,
                       uint64 &round_robin);

// Why a node cannot run a caller's query now, or "" if it can. `write` asks for more than
// reads: a healthy node (degraded serves reads only).
std::string WhyNotServing(const Node &node, bool write);

} // namespace peerpool
