// Validation of node configuration (SPEC section 2). Errors are 22023 with a clear message.
#include "pg_peerpool/pool/node_config.hpp"

#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/conninfo.hpp"

namespace peerpool {

void ValidateNodeName(const std::string &name)
{
    bool ok = !name.empty() && name.size() < static_cast<size_t>(kNodeNameSize);
    for (char c : name)
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            ok = false;
    if (!ok)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "invalid node name",
                    "A node name is 1 to 63 characters from A-Z, a-z, 0-9, \"_\", \".\" and \"-\".");
}

NodeRole ParseRole(const std::string &role)
{
    if (role == "auto")
        return NODE_ROLE_AUTO;
    if (role == "primary")
        return NODE_ROLE_PRIMARY;
    if (role == "standby")
        return NODE_ROLE_STANDBY;
    throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "invalid role",
                "The role must be \"auto\", \"primary\" or \"standby\".");
}

void ValidateNodeConfig(const NodeConfig &config)
{
    ValidateNodeName(config.name);
    // libpq would read "" as "all defaults": the local server as the server's OS user.
    if (config.conninfo.find_first_not_of(" \t\n\r") == std::string::npos)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "conninfo must not be empty",
                    "An empty connection string would connect to the local server with "
                    "libpq's defaults.");
    ParseConninfo(config.conninfo);
    if (config.max_connections < 1)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "max_connections must be at least 1",
                    Format("max_connections is %d.", config.max_connections));
    if (config.min_connections < 0)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "min_connections must not be negative",
                    Format("min_connections is %d.", config.min_connections));
    if (config.min_connections > config.max_connections)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE,
                    "min_connections must not exceed max_connections",
                    Format("min_connections is %d and max_connections is %d.",
                           config.min_connections, config.max_connections));
    if (config.weight < 0)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "weight must not be negative",
                    Format("weight is %d.", config.weight));
}

} // namespace peerpool
