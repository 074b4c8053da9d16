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

-- isolation: conninfo ownership and the password rule, registry bounds (issue 8)
-- Existing nodes were registered through SECURITY DEFINER functions or by the owner's DML:
-- they become owned by the extension's owner (a superuser), so they keep working as before.
ALTER TABLE peerpool.node ADD COLUMN conninfo_owner regrole;
UPDATE peerpool.node
   SET conninfo_owner = (SELECT e.extowner FROM pg_catalog.pg_extension e
                          WHERE e.extname = 'pg_peerpool')::regrole;
ALTER TABLE peerpool.node ALTER COLUMN conninfo_owner SET NOT NULL;
-- Out-of-bounds rows (SPEC section 2) fail the update here: fix them with pool_alter_node first.
ALTER TABLE peerpool.node DROP CONSTRAINT node_max_connections_check,
    ADD CONSTRAINT node_max_connections_check CHECK (max_connections BETWEEN 1 AND 1000);
ALTER TABLE peerpool.node DROP CONSTRAINT node_weight_check,
    ADD CONSTRAINT node_weight_check CHECK (weight BETWEEN 0 AND 1000000);

CREATE FUNCTION peerpool._node_conninfo_owner()
RETURNS trigger
LANGUAGE C
AS 'MODULE_PATHNAME', 'peerpool_node_conninfo_owner';
REVOKE ALL ON FUNCTION peerpool._node_conninfo_owner() FROM PUBLIC;

CREATE TRIGGER node_conninfo_owner
BEFORE INSERT OR UPDATE ON peerpool.node
FOR EACH ROW EXECUTE FUNCTION peerpool._node_conninfo_owner();

ALTER FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean)
    SECURITY INVOKER;
ALTER FUNCTION peerpool.pool_alter_node(text, text, integer, integer, text, integer, boolean)
    SECURITY INVOKER;

CREATE OR REPLACE VIEW peerpool.nodes AS
SELECT n.node_name,
       peerpool._mask_conninfo(n.conninfo) AS conninfo,
       n.role,
       n.weight,
       n.min_connections,
       n.max_connections,
       n.enabled,
       n.conninfo_owner,
       NOT coalesce(a.rolsuper, false) AS password_required
  FROM peerpool.node n
  LEFT JOIN pg_catalog.pg_authid a ON a.oid = n.conninfo_owner::oid;
