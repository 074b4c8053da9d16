#!/usr/bin/env bash
# `make test-full`: everything `make test` does (format check, pg_regress, TAP, pg_regress on the
# ASan+UBSan build), and in addition the whole TAP suite on the ASan+UBSan build and the opt-in
# profiles: tests that skip themselves unless PEERPOOL_TEST_FULL=1 (real fleets too slow for
# CI). Takes far longer than `make test` (docs/testing.md gives a measured time).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)

# Opt-in profiles: TAP files check this variable and skip without it.
export PEERPOOL_TEST_FULL=1
# scripts/sanitize_check.sh (run by test.sh): pg_regress and the whole TAP suite, not pg_regress
# alone.
export SANITIZE_TAP=1
exec bash "$SRC/scripts/test.sh"
