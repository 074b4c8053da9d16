-- parallel_query() and pool_query() (SPEC section 5) against real peers: this server itself,
-- registered twice over its Unix socket ("self" and "twin"), plus a node that refuses
-- connections ("dead").
\set VERBOSITY default
\set SHOW_CONTEXT errors

-- Reports the SQLSTATE and message of a statement's error (details here hold temp paths).
CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

SELECT peerpool.pool_add_node('self', format('host=%s port=%s dbname=postgres',
       current_setting('unix_socket_directories'), current_setting('port')));
SELECT peerpool.pool_add_node('twin', format('host=%s port=%s dbname=postgres',
       current_setting('unix_socket_directories'), current_setting('port')), weight => 0);
SELECT peerpool.pool_add_node('dead', format('host=%s port=1 dbname=postgres',
       current_setting('unix_socket_directories')));
SELECT node_name, state FROM peerpool.pool_check_health() ORDER BY node_name;

-- Result shape and jsonb typing: numbers, booleans, json/jsonb embedded, NULL, the rest text.
SELECT node_name, success, result, error
  FROM peerpool.parallel_query($$
      SELECT 1 AS i, 2.50::numeric AS n, 1.5::float8 AS f, 'NaN'::float8 AS nan,
             9007199254740993::bigint AS big, true AS t, false AS ff, NULL::int AS nothing,
             'text "quoted"'::text AS s, '{"a": [1, 2]}'::jsonb AS jb, '[1, 2]'::json AS js,
             '2026-01-02'::date AS d, ARRAY[1, 2] AS arr, 'x'::bytea AS bytes$$,
      ARRAY['self']);
SELECT jsonb_typeof(result -> 0 -> 'i') AS i, jsonb_typeof(result -> 0 -> 'n') AS n,
       jsonb_typeof(result -> 0 -> 't') AS t, jsonb_typeof(result -> 0 -> 'nothing') AS nothing,
       jsonb_typeof(result -> 0 -> 'jb') AS jb, jsonb_typeof(result -> 0 -> 'd') AS d
  FROM peerpool.parallel_query('SELECT 1 AS i, 2.5 AS n, true AS t, NULL AS nothing, ''{}''::jsonb AS jb, current_date AS d',
                               ARRAY['self']);

-- Several rows, an empty result, a command.
SELECT node_name, success, jsonb_array_length(result) AS rows
  FROM peerpool.parallel_query('SELECT g FROM generate_series(1, 1000) g', ARRAY['self', 'twin']);
SELECT node_name, success, result FROM peerpool.parallel_query('SELECT 1 WHERE false', ARRAY['self']);
SELECT node_name, success, result FROM peerpool.parallel_query('SET LOCAL work_mem = ''1MB''', ARRAY['self']);
-- Several statements: the rows of each row-returning statement, each with its own columns.
SELECT node_name, success, result
  FROM peerpool.parallel_query('SELECT 1 AS a; SELECT 2 AS b, 3 AS c; SELECT 4 AS d', ARRAY['self']);
SELECT * FROM peerpool.pool_query('SELECT 1, 2; SELECT 3', 'self') AS t(a int, b int);

-- Every enabled node by default; partial failure is normal; rows in node order.
SELECT node_name, success, result, error ~ '^node "dead" is (unhealthy|reconnecting)' AS dead_reason
  FROM peerpool.parallel_query('SELECT 42 AS answer');

-- Remote errors keep their SQLSTATE (in the error text).
SELECT node_name, success, error FROM peerpool.parallel_query('SELEC 1', ARRAY['self']);
SELECT node_name, success, error FROM peerpool.parallel_query('SELECT 1/0', ARRAY['self']);

-- A per-node deadline: the slow node fails, the call still returns.
SELECT node_name, success, error, elapsed_ms < 5000 AS bounded
  FROM peerpool.parallel_query('SELECT pg_sleep(10)', ARRAY['self'], timeout_ms => 200);

-- Errors of the call itself.
SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['self', 'nope', 'nada']);
SELECT * FROM peerpool.parallel_query(NULL);
SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['self', NULL]);
SELECT * FROM peerpool.parallel_query('SELECT 1', timeout_ms => -1);
SELECT count(*) AS no_targets FROM peerpool.parallel_query('SELECT 1', ARRAY[]::text[]);

-- pool_query: a column definition list, checked against the remote result.
SELECT * FROM peerpool.pool_query('SELECT 1 AS a, ''x'' AS b', 'self') AS t(a int, b text);
SELECT * FROM peerpool.pool_query('SELECT g, g * 2 FROM generate_series(1, 3) g', 'write')
    AS t(g int, twice bigint);
SELECT * FROM peerpool.pool_query('SELECT 1, 2', 'self') AS t(a int);
SELECT * FROM peerpool.pool_query('SELECT ''abc''', 'self') AS t(a int);
SELECT * FROM peerpool.pool_query('SELECT 1', 'self');

-- Remote errors are re-raised with the remote SQLSTATE, message, detail and hint.
SELECT * FROM peerpool.pool_query('SELEC 1', 'self') AS t(a int);
SELECT * FROM peerpool.pool_query('SELECT 1/0', 'self') AS t(a int);
SELECT * FROM peerpool.pool_query($q$DO $x$ BEGIN RAISE EXCEPTION 'custom failure'
    USING ERRCODE = 'P0042', DETAIL = 'remote detail', HINT = 'remote hint'; END $x$$q$,
    'self') AS t(a int);
DO $$
DECLARE state text;
BEGIN
    PERFORM * FROM peerpool.pool_query('SELECT 1/0', 'self') AS t(a int);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
    RAISE NOTICE 'caught SQLSTATE %', state;
END $$;
DO $do$
DECLARE state text; msg text; detail text; hint text;
BEGIN
    PERFORM * FROM peerpool.pool_query($q$DO $x$ BEGIN RAISE EXCEPTION 'custom failure'
        USING ERRCODE = 'P0042', DETAIL = 'remote detail', HINT = 'remote hint'; END $x$$q$,
        'self') AS t(a int);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
    RAISE NOTICE 'caught % / % / % / %', state, msg, detail, hint;
END $do$;

-- Targets: bad, unknown, nothing eligible.
SELECT * FROM peerpool.pool_query('SELECT 1', 'nope') AS t(a int);
SELECT pg_temp.try($$SELECT * FROM peerpool.pool_query('SELECT 1', 'dead') AS t(a int)$$) AS dead;
SELECT pg_temp.try($$SELECT * FROM peerpool.pool_query('SELECT 1', 'standby') AS t(a int)$$) AS standby;
SELECT * FROM peerpool.pool_query('SELECT 1', '') AS t(a int);
SELECT * FROM peerpool.pool_query('SELECT 1', NULL) AS t(a int);

-- A statement timeout on the caller cancels the remote query; the session stays usable.
SET statement_timeout = '300ms';
SELECT * FROM peerpool.pool_query('SELECT pg_sleep(10)', 'self') AS t(a text);
RESET statement_timeout;
SELECT * FROM peerpool.pool_query('SELECT ''still works''', 'self') AS t(a text);

-- COPY is refused (0A000) and its connection discarded.
SELECT * FROM peerpool.pool_query('COPY (SELECT 1) TO STDOUT', 'self') AS t(a int);
-- A remote query that swallows the cancel and then starts COPY: the caller still gets its
-- timeout, and the pool manager stays responsive (it used to spin on the COPY).
SELECT * FROM peerpool.pool_query($q$DO $x$ BEGIN PERFORM pg_sleep(2);
    EXCEPTION WHEN query_canceled THEN NULL; END $x$; COPY (SELECT 1) TO STDOUT$q$,
    'self', timeout_ms => 300) AS t(a int);
SELECT * FROM peerpool.pool_query('SELECT ''responsive''', 'self') AS t(a text);
SELECT node_name, state FROM peerpool.pool_check_health('self');

-- A connection left inside a transaction is never handed to the next caller.
SELECT * FROM peerpool.pool_query('BEGIN', 'self') AS t(a text);
SELECT * FROM peerpool.pool_query('SELECT now() = statement_timestamp() AS fresh_transaction',
                                  'self') AS t(fresh boolean);

-- The pool counted the work.
SELECT node_name, queries > 0 AS counted, errors > 0 AS errors_counted, acquires >= queries AS acquired
  FROM peerpool.pool_stats WHERE node_name = 'self';

SELECT peerpool.pool_remove_node(node_name) FROM peerpool.nodes ORDER BY node_name;
