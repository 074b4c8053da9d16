-- Results arrive exactly as the node sent them (SPEC section 5, issue 9): repeated column
-- names keep every value, json that jsonb cannot hold fails that node only, the jsonb arrays
-- built row by row equal what jsonb itself builds, and parallel_query_rows returns every
-- node's rows typed. Encodings need peers of other encodings: t/020_fidelity.pl.
\set VERBOSITY default
\set SHOW_CONTEXT errors

-- "self" and "twin" are this server; twin's sessions carry a custom setting that queries use
-- to answer differently there.
SELECT peerpool.pool_add_node('self', format('host=%s port=%s dbname=postgres',
       current_setting('unix_socket_directories'), current_setting('port')));
SELECT peerpool.pool_add_node('twin', format('host=%s port=%s dbname=postgres options=''-c fidelity.twin=on''',
       current_setting('unix_socket_directories'), current_setting('port')));
SELECT peerpool.pool_add_node('dead', 'host=127.0.0.1 port=1 dbname=postgres connect_timeout=2');
SELECT node_name, state FROM peerpool.pool_check_health() ORDER BY node_name;
SELECT node_name, result FROM peerpool.parallel_query(
    $$SELECT coalesce(current_setting('fidelity.twin', true), 'off') AS twin$$, ARRAY['self', 'twin']);

-- Repeated column names keep every value: name, name_2, name_3, ...
SELECT result FROM peerpool.parallel_query('SELECT 1, 2', ARRAY['self']);
SELECT result FROM peerpool.parallel_query(
    $$SELECT coalesce(NULL, 'a') AS coalesce, coalesce(NULL, 'b'), coalesce(NULL, 'c')$$, ARRAY['self']);
-- A generated name never takes the name of a real column: the next free number is used.
SELECT result FROM peerpool.parallel_query('SELECT 1 AS a, 2 AS a, 3 AS a_2, 4 AS a, 5 AS a_2', ARRAY['self']);
SELECT jsonb_object_keys(result -> 0) AS key
  FROM peerpool.parallel_query('SELECT 1 AS x, 2 AS x_3, 3 AS x, 4 AS x, 5 AS x', ARRAY['self'])
 ORDER BY 1;
-- 50 columns, 10 names: 50 keys.
SELECT (SELECT count(*) FROM jsonb_object_keys(result -> 0)) AS keys
  FROM peerpool.parallel_query(
      (SELECT 'SELECT ' || string_agg(format('%s AS c%s', g, g % 10), ', ') FROM generate_series(1, 50) g),
      ARRAY['self']);
-- Rows without columns are empty objects.
SELECT result FROM peerpool.parallel_query('SELECT FROM generate_series(1, 2)', ARRAY['self']);
SELECT * FROM peerpool.parallel_query_rows('SELECT FROM generate_series(1, 2)', ARRAY['self']) AS t(node text);
-- pool_query and parallel_query_rows take columns by position, so they keep every value too.
SELECT * FROM peerpool.pool_query('SELECT 1, 2', 'self') AS t(a int, b int);

-- json that jsonb cannot hold fails that node's row only; the other node answers.
SELECT node_name, success, result, error
  FROM peerpool.parallel_query($$SELECT CASE WHEN current_setting('fidelity.twin', true) = 'on'
      THEN '"a\u0000b"'::json ELSE '1'::json END AS j$$, ARRAY['self', 'twin'])
 ORDER BY node_name;
SELECT node_name, success, result, error
  FROM peerpool.parallel_query($$SELECT g, CASE WHEN current_setting('fidelity.twin', true) = 'on' AND g = 3
      THEN '"\ud800"'::json ELSE '{"ok": true}'::json END AS j FROM generate_series(1, 3) g$$,
      ARRAY['self', 'twin'])
 ORDER BY node_name;
-- json the jsonb type can hold is embedded as it is, duplicate keys and all, as jsonb would.
SELECT result FROM peerpool.parallel_query($$SELECT '{"b": 1, "a": [1, "x", null], "b": 2}'::json AS j,
    '"\u00e9"'::json AS e, '3.0'::json AS n, 'null'::json AS jn$$, ARRAY['self']);

-- The arrays built row by row are the ones jsonb builds, and work with every jsonb operator
-- (more than JB_OFFSET_STRIDE = 32 rows, rows of uneven length, nested containers).
SELECT result = (SELECT jsonb_agg(jsonb_build_object('g', g, 's', repeat('x', g % 7), 'f', g / 4.0,
                                                     'b', g % 2 = 0, 'n', NULL, 'j', jsonb_build_array(g, 'y')))
                   FROM generate_series(1, 100) g) AS same,
       result::text::jsonb = result AS reparsed,
       result -> 40 ->> 's' AS s40, result -> 99 -> 'j' AS j99, jsonb_array_length(result) AS rows,
       result @> '[{"g": 77, "b": false}]' AS contains
  FROM peerpool.parallel_query($$SELECT g, repeat('x', g % 7) AS s, g / 4.0 AS f, g % 2 = 0 AS b,
                                        NULL::int AS n, jsonb_build_array(g, 'y') AS j
                                   FROM generate_series(1, 100) g$$, ARRAY['self']);
-- The same without a json column (rows are then built from pre-sorted pairs).
SELECT result = (SELECT jsonb_agg(jsonb_build_object('g', g, 'long_name', repeat('x', g % 7), 'f', g / 4.0,
                                                     'b', g % 2 = 0, 'n', NULL, 'ab', -g::float8 / 3))
                   FROM generate_series(1, 100) g) AS same,
       result::text::jsonb = result AS reparsed, result -> 63 AS r63, result @> '[{"g": 77, "b": false}]' AS contains
  FROM peerpool.parallel_query($$SELECT g, repeat('x', g % 7) AS long_name, g / 4.0 AS f, g % 2 = 0 AS b,
                                        NULL::int AS n, -g::float8 / 3 AS ab
                                   FROM generate_series(1, 100) g$$, ARRAY['self']);
SELECT result, jsonb_array_length(result) AS rows FROM peerpool.parallel_query('SELECT 1 WHERE false', ARRAY['self']);
-- Numbers as numbers, NaN and infinities as strings, as before.
SELECT result FROM peerpool.parallel_query($$SELECT 'NaN'::numeric AS nan, '-Infinity'::float8 AS ninf,
    1e-5::float8 AS small, 123456789012345678901234567890.5 AS big, 32767::int2 AS i2, 42::oid AS o$$,
    ARRAY['self']);

-- Integers of every size (a short fast path, numeric_in beyond 18 digits) are the numbers jsonb makes.
SELECT result = jsonb_build_array(jsonb_build_object('a', 0, 'b', -5, 'c', 123456789012345678,
           'd', -123456789012345678, 'e', 9223372036854775807, 'f', -9223372036854775808, 'g', 4294967295)) AS same,
       result
  FROM peerpool.parallel_query($$SELECT 0 AS a, -5 AS b, 123456789012345678 AS c, -123456789012345678 AS d,
           9223372036854775807 AS e, (-9223372036854775807 - 1)::int8 AS f, 4294967295::oid AS g$$, ARRAY['self']);

-- parallel_query_rows: every node's rows, typed, the node name first.
SELECT * FROM peerpool.parallel_query_rows(
    $$SELECT g, 'v' || g, g % 2 = 0, coalesce(current_setting('fidelity.twin', true), 'off')
        FROM generate_series(1, 2) g$$, ARRAY['self', 'twin'])
    AS t(node text, g int, v text, even boolean, twin text)
 ORDER BY node, g;
-- The node name column may be of any type that takes the name as input.
SELECT node, pg_typeof(node) AS type, x FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self'])
    AS t(node name, x int);
-- Types are converted by the local input functions, as pool_query does.
SELECT * FROM peerpool.parallel_query_rows($$SELECT '0/16B3748'::pg_lsn, '{1,2}'::int[], '{"a":1}'::jsonb, NULL::text$$,
    ARRAY['self']) AS t(node text, lsn pg_lsn, arr int[], j jsonb, nothing text);
-- Several statements, like pool_query: every row-returning statement's rows.
SELECT * FROM peerpool.parallel_query_rows('SELECT 1; SELECT 2', ARRAY['self']) AS t(node text, x int);

-- A failed node: warning (the default) names it with its SQLSTATE; the others' rows return.
SELECT * FROM peerpool.parallel_query_rows(
    $$SELECT 1 / CASE WHEN current_setting('fidelity.twin', true) = 'on' THEN 0 ELSE 1 END$$,
    ARRAY['self', 'twin']) AS t(node text, x int);
-- ignore: skipped silently.
SELECT * FROM peerpool.parallel_query_rows(
    $$SELECT 1 / CASE WHEN current_setting('fidelity.twin', true) = 'on' THEN 0 ELSE 1 END$$,
    ARRAY['self', 'twin'], on_error => 'ignore') AS t(node text, x int);
-- error: raised as pool_query raises it (remote SQLSTATE, message, detail, hint).
SELECT * FROM peerpool.parallel_query_rows(
    $$SELECT 1 / CASE WHEN current_setting('fidelity.twin', true) = 'on' THEN 0 ELSE 1 END$$,
    ARRAY['self', 'twin'], on_error => 'error') AS t(node text, x int);
SELECT * FROM peerpool.parallel_query_rows($q$DO $x$ BEGIN RAISE EXCEPTION 'custom failure'
    USING ERRCODE = 'P0042', DETAIL = 'remote detail', HINT = 'remote hint'; END $x$$q$,
    ARRAY['self'], on_error => 'error') AS t(node text, x int);
-- A node that fails after sending rows contributes none of them.
SELECT node, count(*) FROM peerpool.parallel_query_rows(
    $$SELECT g, g / CASE WHEN g = 50000 AND current_setting('fidelity.twin', true) = 'on' THEN 0 ELSE 1 END
        FROM generate_series(1, 50000) g$$, ARRAY['self', 'twin']) AS t(node text, g int, x int)
 GROUP BY node ORDER BY node;
-- An unreachable node is a failed node like any other.
CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT * FROM peerpool.parallel_query_rows('SELECT 42', ARRAY['self', 'dead'], on_error => 'ignore')
    AS t(node text, x int);
SELECT regexp_replace(pg_temp.try($$SELECT * FROM peerpool.parallel_query_rows('SELECT 42',
           ARRAY['self', 'dead'], on_error => 'error') AS t(node text, x int)$$),
       'is (unhealthy|reconnecting): .*', 'is down: ...') AS error;
-- Every enabled node by default.
SELECT * FROM peerpool.parallel_query_rows('SELECT 42', on_error => 'ignore') AS t(node text, x int)
 ORDER BY node;
-- The per-node deadline: the slow node fails, the call returns.
SELECT * FROM peerpool.parallel_query_rows(
    $$SELECT CASE WHEN current_setting('fidelity.twin', true) = 'on' THEN pg_sleep(10)::text ELSE 'quick' END$$,
    ARRAY['self', 'twin'], timeout_ms => 300) AS t(node text, x text);

-- Column count and type mismatches: the errors of pool_query.
SELECT * FROM peerpool.parallel_query_rows('SELECT 1, 2', ARRAY['self']) AS t(node text, a int);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self']) AS t(node text);
SELECT * FROM peerpool.parallel_query_rows('SELECT ''abc''', ARRAY['self']) AS t(node text, a int);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self']);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self']) AS t(node int, a int);
-- Errors of the call itself.
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self'], on_error => 'abort') AS t(node text, a int);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self'], on_error => NULL) AS t(node text, a int);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', ARRAY['self', 'nope']) AS t(node text, a int);
SELECT * FROM peerpool.parallel_query_rows(NULL) AS t(node text, a int);
SELECT * FROM peerpool.parallel_query_rows('SELECT 1', timeout_ms => -1) AS t(node text, a int);
SELECT count(*) AS no_targets FROM peerpool.parallel_query_rows('SELECT 1', ARRAY[]::text[]) AS t(node text, a int);
-- A statement timeout cancels it; the session stays usable.
SET statement_timeout = '300ms';
SELECT * FROM peerpool.parallel_query_rows('SELECT pg_sleep(10)::text', ARRAY['self', 'twin']) AS t(node text, x text);
RESET statement_timeout;
SELECT * FROM peerpool.parallel_query_rows('SELECT ''still works''', ARRAY['self']) AS t(node text, x text);

SELECT peerpool.pool_remove_node(node_name) FROM peerpool.nodes ORDER BY node_name;
