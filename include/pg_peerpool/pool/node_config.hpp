// A node's configuration as stored in peerpool.node, and the validation rules of SPEC section 2.
#pragma once

#include <string>

#include "pg_peerpool/shmem.hpp"

namespace peerpool {

struct NodeConfig {
    std::string name;
    std::string conninfo; // may hold a password: never logged, never put in shared memory
    int min_connections = 1;
    int max_connections = 10;
    NodeRole role = NODE_ROLE_AUTO;
    int weight = 100;
    bool enabled = true;
    // The role that set the conninfo (peerpool.node.conninfo_owner) is not a superuser now:
    // every connection must authenticate with the conninfo's password (SPEC section 2).
    bool password_required = false;
};

// SPEC section 2 bounds.
constexpr int kMaxConnectionsLimit = 1000;
constexpr int kWeightLimit = 1000000;

// Each throws Error(22023) with a message naming the offending argument.
void ValidateNodeName(const std::string &name);
NodeRole ParseRole(const std::string &role);
void ValidateNodeConfig(const NodeConfig &config); // everything, conninfo included

// The password rule for a conninfo set by a non-superuser: throws Error(28000, "password is
// required") naming the offending keyword, never a value.
void ValidatePasswordRule(const std::string &conninfo);

} // namespace peerpool
