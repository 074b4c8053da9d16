// libpq connection strings: parse (validate), mask passwords, scrub libpq messages.
#include "pg_peerpool/pool/conninfo.hpp"

#include <cstring>
#include <memory>
#include <set>

#include "libpq-fe.h"

#include "pg_peerpool/pg/guard.hpp"

namespace peerpool {

namespace {

struct ConninfoFree {
    void operator()(PQconninfoOption *opts) const { PQconninfoFree(opts); }
};
using ConninfoPtr = std::unique_ptr<PQconninfoOption, ConninfoFree>;

struct PQFree {
    void operator()(char *p) const { PQfreemem(p); }
};
using LibpqString = std::unique_ptr<char, PQFree>;

const std::set<std::string> &OptionNames()
{
    static const std::set<std::string> names = [] {
        std::set<std::string> out;
        ConninfoPtr defaults(PQconndefaults());
        if (defaults)
            for (PQconninfoOption *o = defaults.get(); o->keyword; o++)
                out.insert(o->keyword);
        return out;
    }();
    return names;
}

bool IsSecretKeyword(const std::string &keyword)
{
    // libpq marks the password with dispchar "*"; sslpassword too.
    return keyword == "password" || keyword == "sslpassword";
}

bool StartsWith(const std::string &s, const char *prefix)
{
    return s.compare(0, strlen(prefix), prefix) == 0;
}

bool EndsWith(const std::string &s, const char *suffix)
{
    size_t n = strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

} // namespace

// libpq's parse errors quote fragments of the input ("%s"): a token, or a whole URI, which
// may hold a password -- and a password may itself contain '"', so quote pairs cannot be
// trusted. The message is therefore reduced to its fixed template text: a token is named only
// when it is a libpq option name, and everything from the first quoted piece of user data on
// is cut (shown as "..." where the template needs it).
std::string ScrubLibpqMessage(const std::string &raw)
{
    std::string message = raw;
    while (!message.empty() && (message.back() == '\n' || message.back() == ' '))
        message.pop_back();
    // Shapes whose user data sits between a fixed prefix and a fixed suffix.
    static const struct {
        const char *prefix;
        const char *suffix;
    } kTokenShapes[] = {
        {"missing \"=\" after \"", "\" in connection info string"},
        {"invalid connection option \"", "\""},
    };
    for (const auto &shape : kTokenShapes) {
        size_t p = strlen(shape.prefix), q = strlen(shape.suffix);
        if (message.size() >= p + q && StartsWith(message, shape.prefix) &&
            EndsWith(message, shape.suffix)) {
            std::string token = message.substr(p, message.size() - p - q);
            return std::string(shape.prefix) + (OptionNames().count(token) ? token : "...") +
                   shape.suffix;
        }
    }
    // unexpected character "%c" at position %d in URI (expected ":" or "/"): "%s"
    if (StartsWith(message, "unexpected character \""))
        return "unexpected character in URI";
    // The URI messages end in ': "<user data>"'; their text before that is fixed.
    size_t colon = message.find(": \"");
    if (colon != std::string::npos)
        return message.substr(0, colon);
    size_t quote = message.find('"');
    if (quote != std::string::npos)
        return message.substr(0, quote) + "\"...\"";
    return message;
}

ConnOptions ParseConninfo(const std::string &conninfo)
{
    char *raw_error = nullptr;
    ConninfoPtr opts(PQconninfoParse(conninfo.c_str(), &raw_error));
    LibpqString error(raw_error);
    if (!opts) {
        std::string why = error ? ScrubLibpqMessage(error.get()) : std::string("out of memory");
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "invalid conninfo",
                    Format("libpq could not parse the connection string: %s.", why.c_str()),
                    "Use a libpq keyword/value string or a postgresql:// URI.");
    }
    ConnOptions out;
    for (PQconninfoOption *o = opts.get(); o->keyword; o++)
        if (o->val != nullptr)
            out.emplace_back(o->keyword, o->val);
    return out;
}

bool IsUri(const std::string &conninfo)
{
    size_t start = conninfo.find_first_not_of(" \t\n\r");
    if (start == std::string::npos)
        return false;
    std::string s = conninfo.substr(start);
    return StartsWith(s, "postgresql://") || StartsWith(s, "postgres://");
}

// libpq (conninfo_uri_parse_options) takes the user info up to the first '@' or '/' after
// "scheme://", whichever comes first; the host, port and database name follow up to '?'. An
// unencoded '/' or '@' in a password moves that boundary: the rest of the password becomes a
// host, a port or a database name, shown unmasked wherever the conninfo is. Such a URI has an
// '@' that libpq did not take as the user info separator, or a non-numeric port.
bool UriMisread(const std::string &conninfo, const ConnOptions &options)
{
    if (!IsUri(conninfo))
        return false;
    std::string s = conninfo.substr(conninfo.find("://") + 3);
    size_t stop = s.find_first_of("@/");
    size_t rest = stop != std::string::npos && s[stop] == '@' ? stop + 1 : 0;
    size_t query = s.find('?', rest);
    if (s.substr(rest, query == std::string::npos ? std::string::npos : query - rest).find('@') !=
        std::string::npos)
        return true;
    for (const auto &[key, value] : options) {
        if (key == "host" && value.find('@') != std::string::npos)
            return true;
        if (key == "port")
            for (char c : value)
                if (c != ',' && (c < '0' || c > '9'))
                    return true;
    }
    return false;
}

bool ConninfoSetsNothing(const ConnOptions &options)
{
    for (const auto &[key, value] : options)
        if (!value.empty())
            return false;
    return true;
}

std::string PasswordRuleViolation(const ConnOptions &options)
{
    static const char *const kForbidden[] = {"passfile", "service", "sslkey", "sslcert",
                                             "sslpassword"};
    bool has_password = false;
    for (const auto &[key, value] : options) {
        if (key == "password" && !value.empty())
            has_password = true;
        for (const char *forbidden : kForbidden)
            if (key == forbidden)
                return key;
    }
    return has_password ? std::string() : std::string("password");
}

static std::string QuoteValue(const std::string &value)
{
    bool plain = !value.empty();
    for (char c : value)
        if (c == ' ' || c == '\'' || c == '\\' || c == '=')
            plain = false;
    if (plain)
        return value;
    std::string out = "'";
    for (char c : value) {
        if (c == '\'' || c == '\\')
            out.push_back('\\');
        out.push_back(c);
    }
    out.push_back('\'');
    return out;
}

std::string MaskConninfo(const std::string &conninfo)
{
    char *raw_error = nullptr;
    ConninfoPtr opts(PQconninfoParse(conninfo.c_str(), &raw_error));
    LibpqString error(raw_error);
    if (!opts)
        return "(invalid conninfo)";
    std::string out;
    for (PQconninfoOption *o = opts.get(); o->keyword; o++) {
        if (o->val == nullptr)
            continue;
        if (!out.empty())
            out.push_back(' ');
        out.append(o->keyword).push_back('=');
        out.append(IsSecretKeyword(o->keyword) ? std::string("********") : QuoteValue(o->val));
    }
    return out;
}

} // namespace peerpool
