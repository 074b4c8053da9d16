// PostgreSQL version and compiler differences, in one place: every PG_VERSION_NUM check of the
// tree is here (docs/compatibility.md).
//
// Supported: PostgreSQL 15 (tested); 16 is not known to break (untested: no headers here).
// Older releases lack APIs the code uses unconditionally (shmem_request_hook,
// InitMaterializedSRF, MarkGUCPrefixReserved); 17 changed two that it uses (listed in
// docs/compatibility.md). Both stop here with a clear message rather than deep in the build.
#pragma once

extern "C" {
#include "postgres.h"
}

#if PG_VERSION_NUM < 150000
#error "pg_peerpool needs PostgreSQL 15 or later (see docs/compatibility.md)"
#endif
#if PG_VERSION_NUM >= 170000
#error "pg_peerpool does not build on PostgreSQL 17 yet (see docs/compatibility.md)"
#endif

// printf format checking for our own variadic functions. PostgreSQL's pg_attribute_printf
// names the archetype of the compiler the server was built with (gnu_printf for gcc), which
// clang rejects (-Wignored-attributes under -Werror); `printf` means the same to both.
#define PEERPOOL_PRINTF(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
