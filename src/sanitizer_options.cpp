// Default options of the sanitizer runtimes, compiled into pg_peerpool.so only by
// `make SANITIZE=1` (Makefile). ASAN_OPTIONS/UBSAN_OPTIONS in the environment still apply on
// top of these.
//
// Why they are needed: the runtimes come in as dependencies of pg_peerpool.so, and read their
// options when the library is loaded. In the postmaster (shared_preload_libraries) the
// environment is intact, and backends inherit the parsed options. A backend that loads the
// library late (CREATE EXTENSION without the preload, t/002_install.pl) has already
// overwritten its original environment block with its process title, which is where the
// runtimes read the environment from (/proc/self/environ): without these defaults ASan would
// die there at once ("ASan runtime does not come first in initial library list").
// No instrumentation: the runtimes call these before they are initialized.

extern "C" {

__attribute__((visibility("default"), used, no_sanitize("address", "undefined"))) const char *
__asan_default_options()
{
    // See docs/testing.md (Sanitizers): the runtime is not first in the library list, and
    // PostgreSQL frees by memory context, so leak reports would be noise.
    return "verify_asan_link_order=0:detect_leaks=0";
}

__attribute__((visibility("default"), used, no_sanitize("address", "undefined"))) const char *
__ubsan_default_options()
{
    return "print_stacktrace=1:halt_on_error=1";
}
}
