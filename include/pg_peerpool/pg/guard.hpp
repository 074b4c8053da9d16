// The C/C++ boundary: the only sanctioned ways for errors to cross between PostgreSQL and C++.
//
//  * peerpool::Error is the C++ exception that carries an SQLSTATE, message, detail and hint.
//  * pg::Call(f) runs f, which may ereport(ERROR), and turns that ERROR into a peerpool::Error
//    so C++ destructors run. f itself must only call PostgreSQL functions: it holds no RAII
//    objects and never throws (STYLE.md, rule 3).
//  * Guard(body) is what every extern "C" entry point wraps its C++ body in: any exception is
//    caught, copied into fixed buffers, every C++ frame is unwound, and only then is the error
//    raised with ereport(ERROR). No longjmp ever crosses a C++ frame that owns resources.
#pragma once

#include <cstdarg>
#include <exception>
#include <new>
#include <type_traits>
#include <string>
#include <utility>

#include "pg_peerpool/pg/compat.hpp"

extern "C" {
#include "postgres.h"
#include "fmgr.h"
#include "utils/elog.h"
}

namespace peerpool {

class Error : public std::exception {
public:
    explicit Error(int sqlerrcode, std::string message, std::string detail = {},
                   std::string hint = {}, std::string context = {})
        : sqlerrcode_(sqlerrcode), message_(std::move(message)), detail_(std::move(detail)),
          hint_(std::move(hint)), context_(std::move(context))
    {
    }

    const char *what() const noexcept override { return message_.c_str(); }
    int sqlerrcode() const noexcept { return sqlerrcode_; }
    const std::string &message() const noexcept { return message_; }
    const std::string &detail() const noexcept { return detail_; }
    const std::string &hint() const noexcept { return hint_; }
    const std::string &context() const noexcept { return context_; }

private:
    int sqlerrcode_;
    std::string message_;
    std::string detail_;
    std::string hint_;
    std::string context_;
};

// printf-style formatting into a std::string.
std::string Format(const char *fmt, ...) PEERPOOL_PRINTF(1, 2);

namespace pg {

// Runs fn(arg) inside PG_TRY. On ERROR returns a copy of the error (allocated in the memory
// context current at the call) after clearing PostgreSQL's error state; nullptr on success.
// This is the project's only sigsetjmp: fn must hold no RAII objects and never throw.
ErrorData *RunCatchingErrors(void (*fn)(void *), void *arg);

// Throws the copied error as a peerpool::Error (and frees the copy).
[[noreturn]] void ThrowAsException(ErrorData *edata);

// Runs f() -- PostgreSQL calls only -- and converts an ERROR raised inside into peerpool::Error.
template <typename F> auto Call(F &&f) -> decltype(f())
{
    using Result = decltype(f());
    using Fn = std::remove_reference_t<F>;
    if constexpr (std::is_void_v<Result>) {
        ErrorData *edata = RunCatchingErrors([](void *p) { (*static_cast<Fn *>(p))(); },
                                             static_cast<void *>(&f));
        if (edata != nullptr)
            ThrowAsException(edata);
    } else {
        static_assert(std::is_trivially_copyable_v<Result>,
                      "pg::Call results must be trivially copyable");
        struct Context {
            Fn *f;
            Result result;
        } ctx{&f, Result{}};
        ErrorData *edata = RunCatchingErrors(
            [](void *p) {
                auto *c = static_cast<Context *>(p);
                c->result = (*c->f)();
            },
            static_cast<void *>(&ctx));
        if (edata != nullptr)
            ThrowAsException(edata);
        return ctx.result;
    }
}

} // namespace pg

// A trivially destructible copy of an error, filled inside a catch handler without allocating.
struct PendingError {
    bool set = false;
    int sqlerrcode = 0;
    char message[2048] = {0};
    char detail[1024] = {0};
    char hint[512] = {0};
    char context[1024] = {0};

    void Capture(const Error &e) noexcept;
    void Capture(int code, const char *message, const char *prefix = nullptr) noexcept;
    [[noreturn]] void Raise() const;
};

// Catches whatever `body` throws and records it in `pending`. Returns true on success.
template <typename F> bool CatchAll(F &&body, PendingError &pending) noexcept
{
    try {
        body();
        return true;
    } catch (const Error &e) {
        pending.Capture(e);
    } catch (const std::bad_alloc &) {
        pending.Capture(ERRCODE_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception &e) {
        pending.Capture(ERRCODE_INTERNAL_ERROR, e.what(), "unexpected C++ exception: ");
    } catch (...) {
        pending.Capture(ERRCODE_INTERNAL_ERROR, "unknown C++ exception");
    }
    return false;
}

// The guard for SQL-callable functions: returns body()'s Datum, or raises the error after
// every C++ frame of body has been destroyed.
template <typename F> Datum Guard(F &&body)
{
    PendingError pending;
    Datum result = (Datum)0;
    if (CatchAll([&] { result = body(); }, pending))
        return result;
    pending.Raise();
}

} // namespace peerpool

// Declares an SQL-callable C function `name` whose body is the C++ function `impl`.
#define PEERPOOL_SQL_FUNCTION(name, impl)                                                          \
    extern "C" {                                                                                   \
    PG_FUNCTION_INFO_V1(name);                                                                     \
    Datum name(PG_FUNCTION_ARGS)                                                                   \
    {                                                                                              \
        return peerpool::Guard([&]() -> Datum { return impl(fcinfo); });                           \
    }                                                                                              \
    }
