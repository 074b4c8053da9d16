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
                    "A node name is 1 to 63 characters from A-Z, a-z, 0-9, \"_\", \".\" and "
                    "\"-\".");
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
    ConnOptions options = ParseConninfo(config.conninfo);
    if (ConninfoSetsNothing(options))
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "conninfo must not be empty",
                    "The connection string sets no option.",
                    "An empty connection string would connect to the local server with "
                    "libpq's defaults.");
    // Never quote the URI: the misread part is a password.
    if (UriMisread(config.conninfo, options))
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "invalid conninfo",
                    "libpq would read part of this URI's user name or password as a host, port "
                    "or database name.",
                    "Percent-encode reserved characters in a URI's user name, password and "
                    "database name (\"/\" as %2F, \"@\" as %40, \"?\" as %3F, \"#\" as %23, "
                    "\":\" as %3A), or use a keyword/value string.");
    if (config.max_connections < 1 || config.max_connections > kMaxConnectionsLimit)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE,
                    Format("max_connections must be between 1 and %d", kMaxConnectionsLimit),
                    Format("max_connections is %d.", config.max_connections));
    if (config.min_connections < 0)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "min_connections must not be negative",
                    Format("min_connections is %d.", config.min_connections));
    if (config.min_connections > config.max_connections)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE,
                    "min_connections must not exceed max_connections",
                    Format("min_connections is %d and max_connections is %d.",
                           config.min_connections, config.max_connections));
    if (config.weight < 0 || config.weight > kWeightLimit)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE,
                    Format("weight must be between 0 and %d", kWeightLimit),
                    Format("weight is %d.", config.weight));
}

void ValidatePasswordRule(const std::string &conninfo)
{
    std::string keyword = PasswordRuleViolation(ParseConninfo(conninfo));
    if (keyword.empty())
        return;
    std::string detail =
        keyword == "password"
            ? "Non-superusers must provide a password in the connection string."
            : Format("Non-superusers may not use the connection option \"%s\": it would "
                     "authenticate with the server's own files.",
                     keyword.c_str());
    throw Error(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION, "password is required", detail,
                "A node whose conninfo a non-superuser sets must authenticate with the "
                "password written in it; a superuser may register nodes that use trust, peer, "
                "a password file, a service file or certificates.");
}

} // namespace peerpool
