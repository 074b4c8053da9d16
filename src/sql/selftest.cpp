// peerpool._boundary_selftest(mode): drives the C/C++ boundary from SQL so the regression
// suite can prove that errors cross it correctly and that destructors run (nothing leaks).
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "pg_peerpool/pg/guard.hpp"

extern "C" {
#include "executor/spi.h"
#include "utils/builtins.h"
}

namespace peerpool {

namespace {

// Counts live instances; every error path below must bring it back to zero.
long live_tracked = 0;

struct Tracked {
    std::string payload = std::string(4096, 'x'); // a real heap allocation
    Tracked() { live_tracked++; }
    Tracked(const Tracked &other) : payload(other.payload) { live_tracked++; }
    ~Tracked() { live_tracked--; }
};

void RaiseDivisionByZero()
{
    ereport(ERROR, (errcode(ERRCODE_DIVISION_BY_ZERO),
                    errmsg("error raised by PostgreSQL inside C++ code"),
                    errdetail("The C++ frames around it owned heap memory."),
                    errhint("Their destructors ran before this error was raised.")));
}

void RunFailingSpi()
{
    if (SPI_connect() != SPI_OK_CONNECT)
        elog(ERROR, "SPI_connect failed");
    SPI_execute("SELECT 1/0", true, 0);
    SPI_finish();
}

} // namespace

static Datum BoundarySelftest(FunctionCallInfo fcinfo)
{
    std::string mode = pg::Call([&] { return text_to_cstring(PG_GETARG_TEXT_PP(0)); });
    if (mode == "live_objects")
        PG_RETURN_INT64(live_tracked);

    Tracked outer;
    std::vector<Tracked> many(8);
    if (mode == "ok")
        PG_RETURN_INT64(static_cast<int64>(many.size()));
    if (mode == "pg_error")
        pg::Call([] { RaiseDivisionByZero(); });
    else if (mode == "spi_error")
        pg::Call([] { RunFailingSpi(); });
    else if (mode == "peerpool_error")
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "error thrown as peerpool::Error",
                    "It carries a detail.", "And a hint.");
    else if (mode == "cpp_exception")
        throw std::runtime_error("std::runtime_error thrown in C++");
    else if (mode == "bad_alloc")
        throw std::bad_alloc();
    else if (mode == "unknown_exception")
        throw 42;
    throw Error(ERRCODE_INVALID_PARAMETER_VALUE, Format("unknown mode \"%s\"", mode.c_str()));
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(peerpool_boundary_selftest, peerpool::BoundarySelftest)
