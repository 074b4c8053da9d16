-- pg_peerpool 0.1.0 -> 0.2.0 upgrade script (ALTER EXTENSION pg_peerpool UPDATE).
-- Every change here is also in pg_peerpool--0.2.0.sql; t/012_upgrade.pl checks that an
-- upgraded schema equals a fresh 0.2.0 install.

\echo Use "ALTER EXTENSION pg_peerpool UPDATE TO '0.2.0'" to load this file. \quit

-- Pool manager liveness (issue 10): peerpool.pool_manager, and node_health.stale so the view
-- does not say 'healthy' while nobody is checking.
CREATE FUNCTION peerpool._pool_manager(
    OUT pid              integer,
    OUT state            text,
    OUT started_at       timestamptz,
    OUT last_heartbeat   timestamptz,
    OUT heartbeat_age_ms double precision,
    OUT restarts         integer,
    OUT stopped_at       timestamptz)
RETURNS record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'peerpool_pool_manager';

CREATE VIEW peerpool.pool_manager AS
SELECT * FROM peerpool._pool_manager();

-- A column added at the end: CREATE OR REPLACE keeps the view's dependants (pool_check_health).
CREATE OR REPLACE VIEW peerpool.node_health AS
SELECT h.*, m.state <> 'running' AS stale
  FROM peerpool._node_health() h CROSS JOIN peerpool._pool_manager() m;

REVOKE ALL ON FUNCTION peerpool._pool_manager() FROM PUBLIC;
GRANT SELECT ON peerpool.pool_manager TO pg_monitor;
GRANT EXECUTE ON FUNCTION peerpool._pool_manager() TO pg_monitor;

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
