#!/usr/bin/env bash
# `make test`: installs missing dependencies, builds, installs, and runs every test:
# pg_regress (temporary instance with the library preloaded) and the TAP suite, then the
# same regression suite against an ASan+UBSan build. Works as root (tests run as postgres in a
# scratch copy) and as a normal user (install through sudo).
set -Eeuo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/lib.sh"

bash "$SRC/scripts/deps.sh"

# Formatting (.clang-format, .editorconfig): the tree is formatted; any drift fails here.
bash "$SRC/scripts/format_check.sh"

WORK=$(scratch_copy "$SRC")
echo "test: working in $WORK as $TEST_USER"
cd "$WORK"

show_failure() {
    echo "test: FAILED; logs are kept in $WORK"
    for f in "$WORK"/regression.diffs "$WORK"/sanitize/regression.diffs; do
        [ -f "$f" ] && { echo "==== $f"; head -c 20000 "$f"; }
    done
    for f in "$WORK"/tmp_check/log/regress_log_* "$WORK"/sanitize/tmp_check/log/regress_log_* ; do
        [ -f "$f" ] && { echo "==== $f (tail)"; tail -n 60 "$f"; }
    done
    return 0
}
trap 'show_failure' ERR

as_test_user make -j2 PG_CONFIG="$PG_CONFIG"
as_root make install PG_CONFIG="$PG_CONFIG" >/dev/null

# pg_regress, then TAP (prove); the TAP output lists each test file's verdict.
as_test_user make installcheck PG_CONFIG="$PG_CONFIG" PROVE_FLAGS="--timer"

# The same regression suite on the sanitizer build (with SANITIZE_TAP=1, from `make test-full`:
# the TAP suite too); the normal build is reinstalled after.
bash "$SRC/scripts/sanitize_check.sh" "$WORK"
trap - ERR
as_root rm -rf "$WORK"
echo "test: all tests passed${SANITIZE_TAP:+ (test-full: TAP on the sanitizer build too)}"
