// Module magic and _PG_init: refuses to load outside shared_preload_libraries, defines the
// GUCs, reserves shared memory and registers the pool manager background worker.
#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/shmem.hpp"
#include "pg_peerpool/worker/pool_manager.hpp"

extern "C" {
#include "postgres.h"
#include "fmgr.h"
#include "miscadmin.h"

PG_MODULE_MAGIC;

void _PG_init(void);

// Runs in the postmaster (and in each EXEC_BACKEND child). Everything here either cannot fail
// or fails at startup, where PostgreSQL reports it; no C++ object outlives a call.
void _PG_init(void)
{
    if (!process_shared_preload_libraries_in_progress)
        ereport(ERROR,
                (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                 errmsg("pg_peerpool must be loaded via shared_preload_libraries"),
                 errhint("Add pg_peerpool to shared_preload_libraries in postgresql.conf and "
                         "restart the server.")));

    peerpool::DefineGucs();
    peerpool::InstallShmemHooks();
    peerpool::RegisterRegistryXactCallback();
    peerpool::RegisterPoolManager();
}
}
