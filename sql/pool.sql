-- The pool manager against a real peer: this very server, over its Unix socket
-- (SPEC sections 3 and 4): health, pool statistics, events, pool_check_health().
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT peerpool.pool_add_node('self',
    format('host=%s port=%s dbname=postgres application_name=peerpool_regress',
           current_setting('unix_socket_directories'), current_setting('port')),
    min_connections => 2);

-- pool_check_health() waits for the registry to be applied and for a check to complete.
SELECT node_name, state, role, consecutive_failures, last_error, last_sqlstate,
       last_check IS NOT NULL AS checked, last_success = last_check AS last_check_succeeded,
       latency_ms >= 0 AS has_latency, replication_lag_ms, retry_attempt, next_retry_at
  FROM peerpool.pool_check_health('self');

-- A check advances last_check.
CREATE TEMP TABLE before AS SELECT last_check FROM peerpool.node_health WHERE node_name = 'self';
SELECT h.last_check > b.last_check AS advanced
  FROM peerpool.pool_check_health('self') h, before b;

-- The pool keeps min_connections open, each visible here with the conninfo's application_name.
-- A session shows here a moment before the pool manager has read its start-up answer: wait for
-- both views, ours too.
CREATE FUNCTION pg_temp.wait_for(sql text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE ok boolean;
BEGIN
    FOR i IN 1..500 LOOP
        PERFORM pg_stat_clear_snapshot(); -- pg_stat_activity is cached per transaction
        EXECUTE sql INTO ok;
        IF ok THEN RETURN true; END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RETURN false;
END $$;
SELECT pg_temp.wait_for($$SELECT count(*) = 2 FROM pg_stat_activity
                          WHERE application_name = 'peerpool_regress'
                            AND (SELECT idle FROM peerpool.pool_stats
                                  WHERE node_name = 'self') = 2$$) AS two_sessions;
SELECT node_name, state, total, active, idle, waiting, created >= 2 AS created, closed, recycled,
       acquires, acquire_timeouts, queries, errors, avg_query_ms
  FROM peerpool.pool_stats WHERE node_name = 'self';

-- The transitions so far, oldest first. The view lists newest first; events recorded in the
-- same microsecond keep that order, so number the rows as they come and reverse.
CREATE VIEW pg_temp.events_oldest_first AS
SELECT * FROM (SELECT e.*, row_number() OVER () AS newest_rank FROM peerpool.events e) x;
SELECT node_name, from_state, to_state, reason
  FROM pg_temp.events_oldest_first WHERE node_name = 'self' ORDER BY newest_rank DESC;

-- pool_reset_stats() zeroes the counters, not the gauges.
SELECT peerpool.pool_reset_stats();
SELECT total, created, closed, recycled FROM peerpool.pool_stats WHERE node_name = 'self';

-- A node that refuses connections: unhealthy at once, resting there between attempts
-- (reconnecting only while one is in flight), with a backoff.
SELECT peerpool.pool_add_node('nowhere',
    format('host=%s port=1 dbname=postgres', current_setting('unix_socket_directories')));
SELECT node_name, state, consecutive_failures > 0 AS failed, last_error LIKE 'could not connect:%' AS why,
       retry_attempt >= 1 AS retrying, next_retry_at > now() - interval '1 second' AS next_retry_set
  FROM peerpool.pool_check_health('nowhere');
SELECT from_state, to_state,
       CASE to_state WHEN 'connecting' THEN reason
                     WHEN 'unhealthy' THEN (reason LIKE 'could not connect: %')::text
                     ELSE (reason = 'attempt 1')::text END AS reason
  FROM pg_temp.events_oldest_first WHERE node_name = 'nowhere' ORDER BY newest_rank DESC LIMIT 2;

-- Disabling closes the pool; enabling opens it again.
SELECT peerpool.pool_alter_node('self', enabled => false);
SELECT node_name, state FROM peerpool.pool_check_health('self');
SELECT pg_temp.wait_for($$SELECT count(*) = 0 FROM pg_stat_activity
                          WHERE application_name = 'peerpool_regress'$$) AS sessions_closed;
SELECT peerpool.pool_alter_node('self', enabled => true);
SELECT pg_temp.wait_for($$SELECT state = 'healthy' FROM peerpool.node_health
                          WHERE node_name = 'self'$$) AS healthy_again;

-- Errors.
SELECT * FROM peerpool.pool_check_health('nope');
SELECT * FROM peerpool.pool_check_health('bad name');

-- Removal drains the node and closes its connections.
SELECT peerpool.pool_remove_node('self');
SELECT peerpool.pool_remove_node('nowhere');
SELECT pg_temp.wait_for($$SELECT count(*) = 0 FROM pg_stat_activity
                          WHERE application_name = 'peerpool_regress'$$) AS sessions_closed;
SELECT pg_temp.wait_for($$SELECT count(*) = 0 FROM peerpool.node_health$$) AS no_nodes_left;
SELECT from_state, to_state, reason FROM peerpool.events
 WHERE node_name = 'self' ORDER BY at DESC LIMIT 1;
