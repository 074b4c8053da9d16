// Loading peerpool.node from the catalog (in the pool manager) and mirroring it into shared
// memory.
#pragma once

#include <vector>

#include "pg_peerpool/pool/node_config.hpp"

namespace peerpool {

struct Registry {
    bool extension_present = false;
    std::vector<NodeConfig> nodes;
};

// Reads the registry in its own transaction. Throws Error on failure, after aborting the
// transaction, so the caller can retry later.
Registry LoadRegistry();

// What changed between two registry snapshots, by node name.
struct RegistryDiff {
    std::vector<NodeConfig> added;
    std::vector<NodeConfig> changed;           // new configuration
    std::vector<std::string> conninfo_changed; // names whose conninfo changed
    std::vector<std::string> removed;
};

RegistryDiff DiffRegistry(const std::vector<NodeConfig> &before,
                          const std::vector<NodeConfig> &after);

// Mirrors the configuration into shared memory: claims slots for new nodes (state
// disconnected) and updates changed ones. Slots of removed nodes stay until the pool manager
// has drained them (FreeNodeSlot). Nodes beyond peerpool.max_nodes are skipped with a
// WARNING. Returns the names that got a slot.
std::vector<std::string> MirrorRegistry(const Registry &registry, uint64 generation);

// Frees a drained node's slot.
void FreeNodeSlot(const std::string &name);

// Empties every slot (a starting pool manager owns no connections yet).
void ClearNodeSlots();

} // namespace peerpool
