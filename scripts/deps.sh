#!/usr/bin/env bash
# Installs what building and testing pg_peerpool needs, if missing: the PostgreSQL 15 server
# headers (PGXS), the TAP test prerequisites, a C++ compiler, and contrib (dblink, postgres_fdw).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

missing=()
[ -f /usr/lib/postgresql/15/lib/pgxs/src/makefiles/pgxs.mk ] || missing+=(postgresql-server-dev-15)
perl -MIPC::Run -e 1 2>/dev/null || missing+=(libipc-run-perl)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
[ -x "$PG_BINDIR/postgres" ] || missing+=(postgresql-15)
[ -f /usr/share/postgresql/15/extension/dblink.control ] || missing+=(postgresql-contrib)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "deps: installing ${missing[*]}"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
