# Shared helpers for scripts/*.sh: where PostgreSQL lives, how to become root / postgres.
# PG_CONFIG may point at another PostgreSQL 15 installation (for example a private copy, so
# several checkouts can install and test side by side); the default is Debian's.
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
# The binaries pg_config names (Debian's /usr/bin/pg_config is a wrapper outside bindir); its
# directory when pg_config is not installed yet (scripts/deps.sh installs it).
PG_BINDIR=$("$PG_CONFIG" --bindir 2>/dev/null || dirname "$PG_CONFIG")
export PG_CONFIG

# Runs a command as root (directly, or through sudo for a normal user).
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# initdb refuses root: as root, servers and tests run as the unprivileged postgres user.
if [ "$(id -u)" = 0 ]; then
    TEST_USER=postgres
    as_test_user() { runuser -u postgres -- "$@"; }
else
    TEST_USER=$(id -un)
    as_test_user() { "$@"; }
fi

# Builds one of the benchmark's client programs, bench/NAME.cpp, into bench/NAME (libpq only).
build_bench_tool() {
    g++ -std=c++17 -O2 -Wall -Wextra -pthread -I"$("$PG_CONFIG" --includedir)" \
        "$SRC/bench/$1.cpp" -o "$SRC/bench/$1" -L"$("$PG_CONFIG" --libdir)" -lpq
}

# Copies the source tree (without .git and build products) into a fresh directory the test
# user owns, and prints its path.
scratch_copy() {
    local src=$1 dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/pg_peerpool.XXXXXX")
    tar -C "$src" --exclude=.git --exclude='*.o' --exclude='*.d' --exclude='*.so' \
        --exclude=tmp_check --exclude=tmp_check_regress --exclude=results -cf - . |
        tar -C "$dir" -xf -
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; fi
    echo "$dir"
}
