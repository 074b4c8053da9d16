-- pg_peerpool 0.2.0 install script (a fresh install; 0.1.0 installs upgrade with pg_peerpool--0.1.0--0.2.0.sql).
-- Contract: shared SPEC.md sections 1, 2, 4 and 8. Objects live in schema peerpool.

\echo Use "CREATE EXTENSION pg_peerpool" to load this file. \quit

-- Creating a C function loads the library first. Without shared_preload_libraries, _PG_init
-- refuses with SQLSTATE 55000 and a hint, so nothing below runs. The call then refuses any
-- database other than peerpool.database, and asks the pool manager to load the registry at commit.
CREATE FUNCTION peerpool._assert_installable()
RETURNS void
LANGUAGE C
AS 'MODULE_PATHNAME', 'peerpool_assert_installable';

SELECT peerpool._assert_installable();

-- The durable node registry: the source of truth the pool manager mirrors into shared memory.
-- Only the owner can read it (it may hold passwords); everyone else reads peerpool.nodes.
-- The CHECK constraints repeat the functions' validation so direct DML cannot store garbage.
CREATE TABLE peerpool.node (
    node_name       text        NOT NULL PRIMARY KEY
                    CHECK (node_name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    conninfo        text        NOT NULL CHECK (btrim(conninfo) <> ''),
    min_connections integer     NOT NULL DEFAULT 1  CHECK (min_connections >= 0),
    max_connections integer     NOT NULL DEFAULT 10
                    CHECK (max_connections BETWEEN 1 AND 1000),
    role            text        NOT NULL DEFAULT 'auto'
                    CHECK (role IN ('auto', 'primary', 'standby')),
    weight          integer     NOT NULL DEFAULT 100 CHECK (weight BETWEEN 0 AND 1000000),
    enabled         boolean     NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The role that set the current conninfo (trigger node_conninfo_owner). Unless it is a
    -- superuser, every connection must authenticate with the conninfo's password.
    conninfo_owner  regrole     NOT NULL,
    CHECK (min_connections <= max_connections)
);
REVOKE ALL ON peerpool.node FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('peerpool.node', '');

-- Any committed change to the table, by our functions or by direct DML/pg_restore, wakes the
-- pool manager at commit so it reloads the registry.
CREATE FUNCTION peerpool._node_changed()
RETURNS trigger
LANGUAGE C
AS 'MODULE_PATHNAME', 'peerpool_node_changed';

CREATE TRIGGER node_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON peerpool.node
FOR EACH STATEMENT EXECUTE FUNCTION peerpool._node_changed();

-- Records who set each row's conninfo: the role calling pool_add_node/pool_alter_node, or the
-- role doing direct DML (a superuser may name another owner, e.g. when restoring a dump).
CREATE FUNCTION peerpool._node_conninfo_owner()
RETURNS trigger
LANGUAGE C
AS 'MODULE_PATHNAME', 'peerpool_node_conninfo_owner';

CREATE TRIGGER node_conninfo_owner
BEFORE INSERT OR UPDATE ON peerpool.node
FOR EACH ROW EXECUTE FUNCTION peerpool._node_conninfo_owner();

-- Registry functions: GRANT EXECUTE is all an admin needs to hand out. pool_add_node and
-- pool_alter_node are SECURITY INVOKER so that they know the calling role (it becomes the
-- conninfo's owner); they write the owner-only table as its owner from C. pool_remove_node is
-- SECURITY DEFINER. The search_path is pinned and the C code names every object
-- schema-qualified.
CREATE FUNCTION peerpool.pool_add_node(
    node_name       text,
    conninfo        text,
    min_connections integer DEFAULT 1,
    max_connections integer DEFAULT 10,
    role            text    DEFAULT 'auto',
    weight          integer DEFAULT 100,
    enabled         boolean DEFAULT true)
RETURNS void
LANGUAGE C
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pool_add_node';

CREATE FUNCTION peerpool.pool_alter_node(
    node_name       text,
    conninfo        text    DEFAULT NULL,
    min_connections integer DEFAULT NULL,
    max_connections integer DEFAULT NULL,
    role            text    DEFAULT NULL,
    weight          integer DEFAULT NULL,
    enabled         boolean DEFAULT NULL)
RETURNS void
LANGUAGE C
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pool_alter_node';

CREATE FUNCTION peerpool.pool_remove_node(node_name text)
RETURNS void
LANGUAGE C
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pool_remove_node';

-- Masks the password of a conninfo string or URI (libpq's parser decides what a password is).
CREATE FUNCTION peerpool._mask_conninfo(conninfo text)
RETURNS text
LANGUAGE C
STRICT IMMUTABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'peerpool_mask_conninfo';

-- password_required: the owner of the conninfo is not a superuser now (a dropped owner: not
-- one). The view reads pg_authid with its owner's rights and shows only rolsuper.
CREATE VIEW peerpool.nodes AS
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

-- Live health from shared memory; readers take the registry LWLock in shared mode only.
CREATE FUNCTION peerpool._node_health(
    OUT node_name            text,
    OUT state                text,
    OUT role                 text,
    OUT state_since          timestamptz,
    OUT last_check           timestamptz,
    OUT last_success         timestamptz,
    OUT consecutive_failures integer,
    OUT last_error           text,
    OUT last_sqlstate        text,
    OUT latency_ms           double precision,
    OUT replication_lag_ms   double precision,
    OUT retry_attempt        integer,
    OUT next_retry_at        timestamptz)
RETURNS SETOF record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'peerpool_node_health';

-- Is anybody checking? The pool manager's liveness: it writes a heartbeat at every wake of its
-- loop (at least once a second). state is 'running', 'not responding' (heartbeat older than
-- 5 s: hung, stopped by a signal, or shutting down) or 'stopped' (terminated, restarting).
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

-- stale: the rows are what the pool manager last published, and no running pool manager is
-- confirming them (state and last_check are then not current).
CREATE VIEW peerpool.node_health AS
SELECT h.*, m.state <> 'running' AS stale
  FROM peerpool._node_health() h CROSS JOIN peerpool._pool_manager() m;

-- Pool statistics (atomics in shared memory: reading never waits for the pool manager).
CREATE FUNCTION peerpool.pool_stats(
    OUT node_name        text,
    OUT state            text,
    OUT total            integer,
    OUT active           integer,
    OUT idle             integer,
    OUT waiting          integer,
    OUT created          bigint,
    OUT closed           bigint,
    OUT recycled         bigint,
    OUT acquires         bigint,
    OUT acquire_timeouts bigint,
    OUT queries          bigint,
    OUT errors           bigint,
    OUT avg_query_ms     double precision)
RETURNS SETOF record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'peerpool_pool_stats';

CREATE VIEW peerpool.pool_stats AS
SELECT * FROM peerpool.pool_stats();

CREATE FUNCTION peerpool.pool_reset_stats()
RETURNS void
LANGUAGE C
AS 'MODULE_PATHNAME', 'peerpool_pool_reset_stats';

-- Recent state transitions, newest first (a ring of 1024 in shared memory).
CREATE FUNCTION peerpool._events(
    OUT at         timestamptz,
    OUT node_name  text,
    OUT from_state text,
    OUT to_state   text,
    OUT reason     text)
RETURNS SETOF record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'peerpool_events';

CREATE VIEW peerpool.events AS
SELECT * FROM peerpool._events();

-- pool_check_health(): ask the pool manager for a check now, wait for it, return the rows.
CREATE FUNCTION peerpool._request_check(node_name text)
RETURNS void
LANGUAGE C
AS 'MODULE_PATHNAME', 'peerpool_request_check';

CREATE FUNCTION peerpool.pool_check_health(node_name text DEFAULT NULL)
RETURNS SETOF peerpool.node_health
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT peerpool._request_check($1);
    SELECT h.* FROM peerpool.node_health h WHERE $1 IS NULL OR h.node_name = $1
     ORDER BY h.node_name;
$$;

-- Running SQL on nodes (SPEC section 5). Not SECURITY DEFINER: the caller needs EXECUTE,
-- granted explicitly, because these run SQL as each node's configured remote user.
CREATE FUNCTION peerpool.parallel_query(
    sql        text,
    nodes      text[]  DEFAULT NULL,
    timeout_ms integer DEFAULT NULL)
RETURNS TABLE(node_name text, success boolean, result jsonb, error text,
              elapsed_ms double precision)
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'parallel_query';

CREATE FUNCTION peerpool.pool_query(
    sql        text,
    target     text    DEFAULT 'read',
    timeout_ms integer DEFAULT NULL)
RETURNS SETOF record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'pool_query';

-- Every node's rows, typed through a column definition list whose first column receives
-- the node name (SPEC section 5).
CREATE FUNCTION peerpool.parallel_query_rows(
    sql        text,
    nodes      text[]  DEFAULT NULL,
    timeout_ms integer DEFAULT NULL,
    on_error   text    DEFAULT 'warning')
RETURNS SETOF record
LANGUAGE C
VOLATILE
AS 'MODULE_PATHNAME', 'parallel_query_rows';

-- Exercises the C/C++ boundary from SQL (regression tests). Superuser only, like everything.
CREATE FUNCTION peerpool._boundary_selftest(mode text)
RETURNS bigint
LANGUAGE C
STRICT
AS 'MODULE_PATHNAME', 'peerpool_boundary_selftest';

-- Privileges (SPEC section 8): functions are superuser-only until an admin grants EXECUTE;
-- monitoring (pg_monitor) reads the views.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA peerpool FROM PUBLIC;
GRANT USAGE ON SCHEMA peerpool TO pg_monitor;
GRANT SELECT ON peerpool.nodes, peerpool.node_health, peerpool.pool_stats, peerpool.events
   TO pg_monitor;
GRANT EXECUTE ON FUNCTION peerpool._mask_conninfo(text), peerpool._node_health(),
                          peerpool.pool_stats(), peerpool._events()
   TO pg_monitor;
GRANT SELECT ON peerpool.pool_manager TO pg_monitor;
GRANT EXECUTE ON FUNCTION peerpool._pool_manager() TO pg_monitor;
