// Connection strings: validation with libpq's own parser, password masking, and the option
// list the pool manager connects with. Pure C++ over libpq: no PostgreSQL server calls.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace peerpool {

using ConnOptions = std::vector<std::pair<std::string, std::string>>;

// Parses a libpq keyword/value string or URI. Throws Error(22023) with a message that never
// quotes a fragment of the input other than option names (it might be a password).
ConnOptions ParseConninfo(const std::string &conninfo);

// The conninfo as keyword=value pairs with any password replaced by ********. Unparseable
// input is shown as a placeholder, never verbatim.
std::string MaskConninfo(const std::string &conninfo);

// Scrubs quoted fragments of a libpq message unless they are libpq option names.
std::string ScrubLibpqMessage(const std::string &message);

} // namespace peerpool
