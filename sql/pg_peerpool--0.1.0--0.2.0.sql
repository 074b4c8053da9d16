-- pg_peerpool 0.1.0 -> 0.2.0 upgrade script (ALTER EXTENSION pg_peerpool UPDATE).
-- Every change here is also in pg_peerpool--0.2.0.sql; t/012_upgrade.pl checks that an
-- upgraded schema equals a fresh 0.2.0 install.

\echo Use "ALTER EXTENSION pg_peerpool UPDATE TO '0.2.0'" to load this file. \quit
