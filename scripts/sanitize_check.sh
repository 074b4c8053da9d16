#!/usr/bin/env bash
# Builds pg_peerpool with ASan+UBSan, installs it, runs the pg_regress suite with the sanitizer
# runtimes loaded into the server, and reinstalls the normal build.
#
# The runtimes come in as dependencies of pg_peerpool.so when the postmaster preloads it, not
# through LD_PRELOAD: Debian's postgres binary deadlocks in glibc's bindtextdomain() at startup
# when any ASan runtime (gcc's or clang's) is preloaded. Loaded late, ASan checks our stack and
# global accesses and UBSan everything; heap checks are limited because malloc stays glibc's. Usage: sanitize_check.sh
# [scratch-dir-with-sources]. Fails if a sanitizer reports anything.
#
# SANITIZE_TAP=1 (`make test-full`): run `make installcheck`, i.e. pg_regress and then the whole
# TAP suite, instead of pg_regress alone. The TAP servers inherit ASAN_OPTIONS/UBSAN_OPTIONS from
# prove, so every server that preloads pg_peerpool.so writes its reports into the same directory.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"
BASE=${1:-$(scratch_copy "$SRC")}
DIR=$BASE/sanitize
rm -rf "$DIR"
as_test_user mkdir -p "$DIR"
tar -C "$SRC" --exclude=.git --exclude='*.o' --exclude='*.d' --exclude='*.so' --exclude=tmp_check \
    --exclude=tmp_check_regress --exclude=results --exclude=sanitize -cf - . | as_test_user tar -C "$DIR" -xf -
cd "$DIR"

as_test_user make -j2 SANITIZE=1 PG_CONFIG="$PG_CONFIG" >/dev/null
as_root make install SANITIZE=1 PG_CONFIG="$PG_CONFIG" >/dev/null
restore() {
    (cd "$BASE" && as_test_user make -j2 PG_CONFIG="$PG_CONFIG" >/dev/null &&
        as_root make install PG_CONFIG="$PG_CONFIG" >/dev/null) || true
}
trap restore EXIT

# Not `ldd | grep -q`: with pipefail, ldd dying of SIGPIPE after grep's early exit fails it.
LIBS=$(ldd pg_peerpool.so)
grep -q libasan <<<"$LIBS" || { echo "sanitize: libasan not linked"; exit 1; }
grep -q libubsan <<<"$LIBS" || { echo "sanitize: libubsan not linked"; exit 1; }
LOGDIR=$DIR/sanitizer-logs
as_test_user mkdir -p "$LOGDIR"
# PostgreSQL frees by memory context, not one by one: leak checking would only report noise.
export ASAN_OPTIONS="verify_asan_link_order=0:detect_leaks=0:abort_on_error=1:log_path=$LOGDIR/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGDIR/ubsan"
report() {
    local rc=0 logs
    if ls "$LOGDIR"/* >/dev/null 2>&1; then
        echo "sanitize: reports found:"; cat "$LOGDIR"/*; rc=1
    fi
    # A backend that loads the library late (no preload) has lost its environment, so its
    # reports go to stderr, i.e. the server log (src/sanitizer_options.cpp).
    logs=$(grep -l -E '==[0-9]+==ERROR: (Address|Leak)Sanitizer|: runtime error: ' \
        "$DIR"/log/*.log "$DIR"/tmp_check/log/*.log 2>/dev/null || true)
    if [ -n "$logs" ]; then
        echo "sanitize: reports in server logs:"
        grep -h -A 40 -E '==[0-9]+==ERROR: (Address|Leak)Sanitizer|: runtime error: ' $logs
        rc=1
    fi
    return $rc
}
if [ "${SANITIZE_TAP:-}" = 1 ]; then
    # Reports are checked even when a test failed: an abort is usually why it failed.
    rc=0
    as_test_user env ASAN_OPTIONS="$ASAN_OPTIONS" UBSAN_OPTIONS="$UBSAN_OPTIONS" \
        make installcheck PG_CONFIG="$PG_CONFIG" PROVE_FLAGS="--timer" || rc=$?
    report || exit 1
    if [ $rc != 0 ]; then echo "sanitize: pg_regress or TAP failed (logs in $DIR)"; exit $rc; fi
    echo "sanitize: regression and TAP suites clean under ASan+UBSan"
else
    as_test_user env ASAN_OPTIONS="$ASAN_OPTIONS" UBSAN_OPTIONS="$UBSAN_OPTIONS" \
        make installcheck-sanitize PG_CONFIG="$PG_CONFIG"
    report || exit 1
    echo "sanitize: regression suite clean under ASan+UBSan"
fi
