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

# Scratch servers of a benchmark script (bench/reset.sh, bench/scale.sh): a fresh directory
# DIR that the test user owns, holding an initdb'd `template` to copy; every data directory
# added to STARTED is stopped (pg_ctl mode $2) on exit, after bench_cleanup_first when the
# script defines it, and DIR is removed.
bench_servers_init() { # name-prefix stop-mode
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    if [ "$(id -u)" = 0 ]; then chown "$TEST_USER" "$DIR"; fi
    BENCH_STOP_MODE=$2
    STARTED=()
    trap bench_servers_cleanup EXIT
    as_test_user "$PG_BINDIR/initdb" -D "$DIR/template" -A trust -U "$TEST_USER" >/dev/null
}
bench_servers_cleanup() {
    if declare -F bench_cleanup_first >/dev/null; then bench_cleanup_first; fi
    local d
    for d in "${STARTED[@]}"; do
        as_test_user "$PG_BINDIR/pg_ctl" -D "$d" -m "$BENCH_STOP_MODE" stop >/dev/null 2>&1 || true
    done
    rm -rf "$DIR"
}

# CPU time (user + system, clock ticks) a process has used so far; 0 once it is gone.
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# A TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
