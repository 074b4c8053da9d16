-- Privileges (SPEC section 8): functions are superuser-only until granted; pg_monitor reads
-- the views; the registry table (it may hold passwords) is readable by its owner only.
\set VERBOSITY default

CREATE ROLE peerpool_nobody LOGIN;
CREATE ROLE peerpool_monitor LOGIN IN ROLE pg_monitor;
CREATE ROLE peerpool_admin LOGIN;

SELECT peerpool.pool_add_node('p1', 'host=127.0.0.1 user=app password=topsecret');

-- Nobody without a grant may execute any function of the extension.
SELECT p.oid::regprocedure AS function,
       has_function_privilege('peerpool_nobody', p.oid, 'EXECUTE') AS nobody,
       has_function_privilege('peerpool_monitor', p.oid, 'EXECUTE') AS monitor
  FROM pg_proc p
 WHERE p.pronamespace = 'peerpool'::regnamespace
 ORDER BY p.proname;

-- Without USAGE on the schema nothing is reachable at all.
SET ROLE peerpool_nobody;
SELECT peerpool.pool_add_node('x', 'host=127.0.0.1');
SELECT * FROM peerpool.nodes;
RESET ROLE;

-- With USAGE, the function privileges themselves refuse every call.
GRANT USAGE ON SCHEMA peerpool TO peerpool_nobody;
SET ROLE peerpool_nobody;
SELECT peerpool.pool_add_node('x', 'host=127.0.0.1');
SELECT peerpool.pool_alter_node('p1', weight => 1);
SELECT peerpool.pool_remove_node('p1');
SELECT peerpool._boundary_selftest('ok');
SELECT peerpool._assert_installable();
SELECT peerpool._mask_conninfo('host=x');
SELECT * FROM peerpool._node_health();
SELECT * FROM peerpool.node;
SELECT * FROM peerpool.nodes;
SELECT * FROM peerpool.node_health;
SELECT * FROM peerpool.pool_stats;
SELECT * FROM peerpool.events;
SELECT peerpool.pool_reset_stats();
SELECT * FROM peerpool.pool_check_health();
SELECT * FROM peerpool.parallel_query('SELECT 1');
SELECT * FROM peerpool.pool_query('SELECT 1') AS t(x int);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1') AS t(node text, x int);
RESET ROLE;

-- pg_monitor reads the views, with the password masked, but not the table.
SET ROLE peerpool_monitor;
SELECT node_name, conninfo FROM peerpool.nodes;
SELECT node_name FROM peerpool.node_health WHERE node_name = 'p1';
SELECT count(*) >= 0 AS can_read FROM peerpool.pool_stats;
SELECT count(*) >= 0 AS can_read FROM peerpool.pool_stats();
SELECT count(*) >= 0 AS can_read FROM peerpool.events;
SELECT peerpool.pool_reset_stats();
SELECT * FROM peerpool.pool_check_health();
SELECT * FROM peerpool.parallel_query('SELECT 1');
SELECT * FROM peerpool.parallel_query_rows('SELECT 1') AS t(node text, x int);
SELECT * FROM peerpool.node;
SELECT peerpool.pool_remove_node('p1');
RESET ROLE;

-- GRANT EXECUTE is all an admin needs to hand out (pool_add_node and pool_alter_node write
-- the table as its owner, pool_remove_node is SECURITY DEFINER, all with a pinned
-- search_path); the table stays closed to the grantee. A non-superuser's conninfo must carry
-- a password (the password rule: sql/isolation.sql).
GRANT USAGE ON SCHEMA peerpool TO peerpool_admin;
GRANT EXECUTE ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean),
                          peerpool.pool_remove_node(text)
   TO peerpool_admin;
SET ROLE peerpool_admin;
SELECT peerpool.pool_add_node('p2', 'host=127.0.0.1');
SELECT peerpool.pool_add_node('p2', 'host=127.0.0.1 password=pw');
SELECT peerpool.pool_remove_node('p2');
SELECT peerpool.pool_alter_node('p1', weight => 1);
SELECT * FROM peerpool.node;
RESET ROLE;

SELECT proname, prosecdef, proconfig FROM pg_proc
 WHERE pronamespace = 'peerpool'::regnamespace AND (prosecdef OR proconfig IS NOT NULL)
 ORDER BY proname;

SELECT peerpool.pool_remove_node('p1');
REVOKE ALL ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean),
                       peerpool.pool_remove_node(text)
  FROM peerpool_admin;
REVOKE ALL ON SCHEMA peerpool FROM peerpool_admin, peerpool_nobody;
DROP ROLE peerpool_nobody, peerpool_monitor, peerpool_admin;
