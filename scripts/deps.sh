#!/usr/bin/env bash
# Installs what building and testing pg_peerpool needs, if missing: the PostgreSQL 15 server
# headers (PGXS), the TAP test prerequisites, a C++ compiler, contrib (dblink, postgres_fdw),
# clang-format (scripts/format_check.sh) and pg_auto_failover (a real-fleet TAP test). clang
# itself is optional (`make CXX=clang++`).
#
# Each probe looks for the file the build or the tests actually use, never for a file some
# other package also ships (Debian's postgresql-client-15 ships pgxs.mk without the headers).
#   DEPS_DRY_RUN=1   print what would be installed and exit (used by t/000_deps.pl)
#   PG_CONFIG        the PostgreSQL installation to probe (default: Debian's PostgreSQL 15)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# Where pg_config says the server headers and PGXS live; Debian's layout when pg_config itself
# is missing (it comes with postgresql-client-15, which postgresql-15 depends on).
if [ -x "$PG_CONFIG" ]; then
    INCLUDEDIR_SERVER=$("$PG_CONFIG" --includedir-server)
    PGXS_MK=$("$PG_CONFIG" --pgxs)
    SHAREDIR=$("$PG_CONFIG" --sharedir)
    BINDIR=$("$PG_CONFIG" --bindir) # not dirname: /usr/bin/pg_config is Debian's wrapper
else
    BINDIR=$PG_BINDIR
    INCLUDEDIR_SERVER=/usr/include/postgresql/15/server
    PGXS_MK=/usr/lib/postgresql/15/lib/pgxs/src/makefiles/pgxs.mk
    SHAREDIR=/usr/share/postgresql/15
fi
# PGXS's root (lib/pgxs): the TAP framework (PostgreSQL::Test::Cluster) lives under it.
PGXS_ROOT=$(dirname "$(dirname "$(dirname "$PGXS_MK")")")

missing=()
# The headers the build includes first, the PGXS makefile and the TAP framework: all from the
# -dev package (t/000_deps.pl checks that every header the sources include is found when this
# probe is satisfied).
if [ ! -f "$INCLUDEDIR_SERVER/postgres.h" ] || [ ! -f "$INCLUDEDIR_SERVER/postmaster/bgworker.h" ] ||
   [ ! -f "$PGXS_MK" ] || [ ! -f "$PGXS_ROOT/src/test/perl/PostgreSQL/Test/Cluster.pm" ]; then
    missing+=(postgresql-server-dev-15)
fi
perl -MIPC::Run -e 1 2>/dev/null || missing+=(libipc-run-perl)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
[ -x "$BINDIR/postgres" ] || missing+=(postgresql-15)
[ -f "$SHAREDIR/extension/dblink.control" ] || missing+=(postgresql-contrib)
command -v clang-format >/dev/null || missing+=(clang-format)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer) # t/071_pgbouncer.pl
# pg_auto_failover, for t/072_auto_failover.pl's real fleet: pg_autoctl and its extension.
{ command -v pg_autoctl >/dev/null && [ -f "$SHAREDIR/extension/pgautofailover.control" ]; } ||
    missing+=(postgresql-15-auto-failover)

if [ ${#missing[@]} -eq 0 ]; then
    [ -n "${DEPS_DRY_RUN:-}" ] && echo "deps: nothing missing"
    exit 0
fi
if [ -n "${DEPS_DRY_RUN:-}" ]; then
    echo "deps: would install ${missing[*]}"
    exit 0
fi
echo "deps: installing ${missing[*]}"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
