// libpq connection strings: parse (validate), mask passwords, scrub libpq messages.
#include "pg_peerpool/pool/conninfo.hpp"

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

} // namespace

std::string ScrubLibpqMessage(const std::string &message)
{
    std::string out;
    size_t i = 0;
    while (i < message.size()) {
        size_t open = message.find('"', i);
        if (open == std::string::npos) {
            out.append(message, i, std::string::npos);
            break;
        }
        size_t close = message.find('"', open + 1);
        if (close == std::string::npos) {
            out.append(message, i, open - i);
            out.append("\"...\"");
            break;
        }
        std::string fragment = message.substr(open + 1, close - open - 1);
        out.append(message, i, open - i);
        bool keep = fragment.size() <= 1 || OptionNames().count(fragment) > 0;
        out.append("\"").append(keep ? fragment : "...").append("\"");
        i = close + 1;
    }
    while (!out.empty() && (out.back() == '\n' || out.back() == ' '))
        out.pop_back();
    return out;
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
