// The C/C++ boundary: converting PostgreSQL errors to C++ exceptions and back.
// See include/pg_peerpool/pg/guard.hpp for the rules this file implements.
#include "pg_peerpool/pg/guard.hpp"

#include <cstdio>
#include <vector>

extern "C" {
#include "utils/memutils.h"
}

namespace peerpool {

std::string Format(const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    int needed = vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    std::string out;
    if (needed > 0) {
        out.resize(static_cast<size_t>(needed) + 1);
        vsnprintf(out.data(), out.size(), fmt, args);
        out.resize(static_cast<size_t>(needed));
    }
    va_end(args);
    return out;
}

namespace pg {

ErrorData *RunCatchingErrors(void (*fn)(void *), void *arg)
{
    MemoryContext ctx = CurrentMemoryContext;
    ErrorData *volatile edata = nullptr;
    PG_TRY();
    {
        fn(arg);
    }
    PG_CATCH();
    {
        // CopyErrorData must not run in ErrorContext; copy into the caller's context.
        MemoryContextSwitchTo(ctx);
        edata = CopyErrorData();
        FlushErrorState();
    }
    PG_END_TRY();
    return edata;
}

void ThrowAsException(ErrorData *edata)
{
    int code = edata->sqlerrcode;
    std::string message = edata->message ? edata->message : "";
    std::string detail = edata->detail ? edata->detail : "";
    std::string hint = edata->hint ? edata->hint : "";
    std::string context = edata->context ? edata->context : "";
    // FreeErrorData only pfrees; it cannot error.
    FreeErrorData(edata);
    throw Error(code, std::move(message), std::move(detail), std::move(hint), std::move(context));
}

} // namespace pg

static void CopyTruncated(char *dst, size_t size, const char *prefix, const char *src) noexcept
{
    snprintf(dst, size, "%s%s", prefix ? prefix : "", src ? src : "");
}

void PendingError::Capture(const Error &e) noexcept
{
    set = true;
    sqlerrcode = e.sqlerrcode();
    CopyTruncated(message, sizeof(message), nullptr, e.message().c_str());
    CopyTruncated(detail, sizeof(detail), nullptr, e.detail().c_str());
    CopyTruncated(hint, sizeof(hint), nullptr, e.hint().c_str());
    CopyTruncated(context, sizeof(context), nullptr, e.context().c_str());
}

void PendingError::Capture(int code, const char *msg, const char *prefix) noexcept
{
    set = true;
    sqlerrcode = code;
    CopyTruncated(message, sizeof(message), prefix, msg);
    detail[0] = hint[0] = context[0] = '\0';
}

void PendingError::Raise() const
{
    ereport(ERROR, errcode(sqlerrcode), errmsg_internal("%s", message),
            detail[0] ? errdetail_internal("%s", detail) : 0, hint[0] ? errhint("%s", hint) : 0,
            context[0] ? errcontext_msg("%s", context) : 0);
    pg_unreachable();
}

} // namespace peerpool
