#!/usr/bin/env bash
# Installs what building and testing pg_peerpool needs, if missing: the PostgreSQL 15 server
# headers (PGXS), the TAP test prerequisites, a C++ compiler, and contrib (dblink, postgres_fdw).
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
else
    INCLUDEDIR_SERVER=/usr/include/postgresql/15/server
    PGXS_MK=/usr/lib/postgresql/15/lib/pgxs/src/makefiles/pgxs.mk
    SHAREDIR=/usr/share/postgresql/15
fi

missing=()
# The headers the build includes first, and the PGXS makefile: both from the -dev package.
if [ ! -f "$INCLUDEDIR_SERVER/postgres.h" ] || [ ! -f "$INCLUDEDIR_SERVER/postmaster/bgworker.h" ] ||
   [ ! -f "$PGXS_MK" ]; then
    missing+=(postgresql-server-dev-15)
fi
perl -MIPC::Run -e 1 2>/dev/null || missing+=(libipc-run-perl)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
[ -x "$PG_BINDIR/postgres" ] || missing+=(postgresql-15)
[ -f "$SHAREDIR/extension/dblink.control" ] || missing+=(postgresql-contrib)

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
