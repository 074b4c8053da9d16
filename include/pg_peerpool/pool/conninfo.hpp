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

// True for a postgresql:// or postgres:// URI that libpq would misread (SPEC section 2): an
// unencoded '/' or '@' (also '?' or '#' before them) in its password turns the rest of the
// password into a host, port or database name. `options` is ParseConninfo's result.
bool UriMisread(const std::string &conninfo, const ConnOptions &options);

// True when the conninfo sets no option to a non-empty value ("", "postgresql://"): libpq
// would connect to the local server with its defaults.
bool ConninfoSetsNothing(const ConnOptions &options);

// The password rule of SPEC section 2 for a conninfo a non-superuser set: "" when it holds a
// password and names none of passfile, service, sslkey, sslcert, sslpassword; otherwise the
// offending keyword ("password" when the password is missing).
std::string PasswordRuleViolation(const ConnOptions &options);

// Reduces a libpq parse error to its fixed text: a quoted token is named only when it is a
// libpq option name, and everything from the first quoted piece of user data on is cut.
std::string ScrubLibpqMessage(const std::string &message);

} // namespace peerpool
