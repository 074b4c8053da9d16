// The pool manager background worker: registration and entry point.
#pragma once

extern "C" {
#include "postgres.h"
#include "fmgr.h"
}

namespace peerpool {

// Registers the worker (from _PG_init, in the postmaster).
void RegisterPoolManager();

} // namespace peerpool

extern "C" {
// bgw_function_name of the pool manager.
PGDLLEXPORT void peerpool_pool_manager_main(Datum main_arg);
}
