-- pg_peerpool 0.1.0 -> 0.2.0 upgrade script (ALTER EXTENSION pg_peerpool UPDATE).
-- Every change here is also in pg_peerpool--0.2.0.sql; t/012_upgrade.pl checks that an
-- upgraded schema equals a fresh 0.2.0 install.

\echo Use "ALTER EXTENSION pg_peerpool UPDATE TO '0.2.0'" to load this file. \quit

-- Typed fan-out (issue 9): parallel_query_rows, superuser-only until granted (SPEC section 8).
CREATE FUNCTION peerpool.parallel_query_rows(
    sql        text,
    nodes      text[]  DEFAULT NULL,
    timeout_ms integer DEFAULT NULL,
    on_error   text    DEFAULT 'warning')
RETURNS SETOF record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'parallel_query_rows';
REVOKE ALL ON FUNCTION peerpool.parallel_query_rows(text, text[], integer, text) FROM PUBLIC;
