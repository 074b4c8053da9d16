-- The node registry (SPEC section 2): every validation and SQLSTATE, masking, rollback.
\set VERBOSITY default

-- Reports the SQLSTATE and message of a statement's error, or 'ok'.
CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- Polls (bounded) until the pool manager's shared memory shows exactly these node names.
CREATE FUNCTION pg_temp.wait_for_health(expected text[]) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    seen text[];
BEGIN
    FOR i IN 1..500 LOOP
        SELECT coalesce(array_agg(node_name ORDER BY node_name), '{}') INTO seen
          FROM peerpool.node_health;
        IF seen = expected THEN
            RETURN 'node_health: ' || array_to_string(seen, ',');
        END IF;
        PERFORM pg_sleep(0.01);
        -- each statement of a function sees a new snapshot of shared memory anyway
    END LOOP;
    RETURN 'timed out; node_health has ' || array_to_string(seen, ',');
END $$;

-- Full error report for the first of each kind, then the compact form.
SELECT peerpool.pool_add_node('bad name!', 'host=127.0.0.1');

SELECT pg_temp.try($$SELECT peerpool.pool_add_node('', 'host=127.0.0.1')$$) AS empty_name;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node(repeat('n', 64), 'host=127.0.0.1')$$) AS name_64;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node(repeat('n', 63), 'host=127.0.0.1')$$) AS name_63;
SELECT peerpool.pool_remove_node(repeat('n', 63));
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('a/b', 'host=127.0.0.1')$$) AS slash;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node(NULL, 'host=127.0.0.1')$$) AS null_name;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', NULL)$$) AS null_conninfo;

-- conninfo is checked by libpq's parser; no fragment of it is echoed (it may be a password).
SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1 password secret');
SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1 password=x hunter2');
SELECT peerpool.pool_add_node('n1', 'postgresql://u:hunter2@[::1/db');
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', 'hots=127.0.0.1')$$) AS bad_keyword;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', '  ')$$) AS empty_conninfo;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', 'host=''unterminated')$$) AS unterminated;

SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1', min_connections => 5, max_connections => 2);
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1', max_connections => 0)$$) AS max_zero;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1', min_connections => -1)$$) AS min_negative;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1', weight => -1)$$) AS weight_negative;
SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1', role => 'leader');
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1', role => NULL)$$) AS null_role;

-- None of the failed calls left anything behind.
SELECT count(*) AS rows_after_failures FROM peerpool.node;

-- Valid registrations: keyword/value and URI, defaults and explicit values.
SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1 port=5433 dbname=postgres user=app password=s3cret');
SELECT peerpool.pool_add_node('n2', 'postgresql://app:hunter2@127.0.0.1:5434/postgres?sslmode=disable',
                              min_connections => 0, max_connections => 4, role => 'standby',
                              weight => 0, enabled => false);
SELECT peerpool.pool_add_node('n.3_x-y', 'host=/var/run/postgresql port=5435', role => 'primary');

-- Duplicate name.
SELECT peerpool.pool_add_node('n1', 'host=127.0.0.1');

-- Passwords are masked in peerpool.nodes (and only there is the conninfo visible).
SELECT node_name, conninfo, role, weight, min_connections, max_connections, enabled, password_required
  FROM peerpool.nodes ORDER BY node_name;
SELECT count(*) AS views_leaking_passwords FROM peerpool.nodes
 WHERE conninfo LIKE '%s3cret%' OR conninfo LIKE '%hunter2%';

-- The pool manager mirrors committed changes into shared memory.
SELECT pg_temp.wait_for_health('{n.3_x-y,n1,n2}');
-- Nothing listens at these addresses: no node serves; the disabled one is not even tried.
SELECT node_name, state IN ('disconnected', 'connecting', 'unhealthy', 'reconnecting') AS not_serving,
       CASE WHEN node_name = 'n2' THEN state END AS disabled_state
  FROM peerpool.node_health ORDER BY node_name;

-- pool_alter_node: NULL keeps a value; validation sees the merged row.
SELECT peerpool.pool_alter_node('n1', max_connections => 3, weight => 7);
SELECT peerpool.pool_alter_node('n1', min_connections => 4);
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('n1', conninfo => 'nonsense')$$) AS bad_conninfo;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('n1', role => 'leader')$$) AS bad_role;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('n1', weight => -5)$$) AS bad_weight;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('n1', max_connections => 0)$$) AS bad_max;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('bad name')$$) AS bad_name;
SELECT peerpool.pool_alter_node('nope', weight => 1);
SELECT peerpool.pool_alter_node('n2', conninfo => 'host=127.0.0.2 password=other', enabled => true,
                                role => 'auto');
SELECT node_name, conninfo, role, weight, min_connections, max_connections, enabled
  FROM peerpool.nodes ORDER BY node_name;

-- pool_remove_node.
SELECT peerpool.pool_remove_node('nope');
SELECT pg_temp.try($$SELECT peerpool.pool_remove_node('bad name')$$) AS bad_name;
SELECT pg_temp.try($$SELECT peerpool.pool_remove_node(NULL)$$) AS null_name;
SELECT peerpool.pool_remove_node('n.3_x-y');
SELECT pg_temp.wait_for_health('{n1,n2}');

-- A rolled-back add leaves nothing in the table or in node_health.
BEGIN;
SELECT peerpool.pool_add_node('ghost', 'host=127.0.0.1');
SELECT count(*) AS ghost_rows_inside FROM peerpool.node WHERE node_name = 'ghost';
ROLLBACK;
SELECT count(*) AS ghost_rows FROM peerpool.node WHERE node_name = 'ghost';
-- A later committed change is applied; the ghost never appears.
SELECT peerpool.pool_add_node('n4', 'host=127.0.0.1');
SELECT pg_temp.wait_for_health('{n1,n2,n4}');

-- A rolled-back remove keeps the node.
BEGIN;
SELECT peerpool.pool_remove_node('n4');
ROLLBACK;
SELECT peerpool.pool_alter_node('n4', weight => 5);
SELECT pg_temp.wait_for_health('{n1,n2,n4}');

-- peerpool.max_nodes (8 in this instance): the 9th node is refused with 53400.
SELECT peerpool.pool_add_node('m' || i, 'host=127.0.0.1') FROM generate_series(1, 5) i;
SELECT count(*) AS nodes FROM peerpool.node;
SELECT peerpool.pool_add_node('m6', 'host=127.0.0.1');
SELECT count(*) AS nodes_after_refusal FROM peerpool.node;
-- Also when the calls come in one statement (each call sees the rows added before it).
SELECT peerpool.pool_remove_node('m5');
SELECT peerpool.pool_add_node('x' || i, 'host=127.0.0.1') FROM generate_series(1, 3) i;
SELECT count(*) AS nodes_after_batch_refusal FROM peerpool.node;
SELECT peerpool.pool_add_node('m5', 'host=127.0.0.1');
SELECT pg_temp.wait_for_health('{m1,m2,m3,m4,m5,n1,n2,n4}');

-- Direct DML is held to the same rules by CHECK constraints, and wakes the worker too.
SELECT pg_temp.try($$INSERT INTO peerpool.node (node_name, conninfo, min_connections, max_connections)
                      VALUES ('direct', 'host=127.0.0.1', 3, 2)$$) AS direct_min_over_max;
SELECT pg_temp.try($$INSERT INTO peerpool.node (node_name, conninfo) VALUES ('bad name', 'host=x')$$)
       AS direct_bad_name;
DELETE FROM peerpool.node WHERE node_name LIKE 'm%';
SELECT pg_temp.wait_for_health('{n1,n2,n4}');

-- Clean up.
SELECT peerpool.pool_remove_node(node_name) FROM peerpool.node ORDER BY node_name;
SELECT pg_temp.wait_for_health('{}');
