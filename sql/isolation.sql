-- Isolation (issue 8; SPEC sections 2 and 5): the password rule for conninfos set by
-- non-superusers, who owns a conninfo, URIs libpq would misread, registry bounds, and the
-- query_timeout ceiling. Connections themselves are tested in t/030_password_rule.pl.
\set VERBOSITY default

CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

CREATE ROLE iso_add LOGIN;
CREATE ROLE iso_other LOGIN;
GRANT USAGE ON SCHEMA peerpool TO iso_add, iso_other;
GRANT EXECUTE ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean),
                          peerpool.pool_alter_node(text, text, integer, integer, text, integer, boolean),
                          peerpool.pool_remove_node(text)
   TO iso_add;

-- ---- The password rule at registration -------------------------------------------------
-- A non-superuser's conninfo must carry a password and name none of passfile, service,
-- sslkey, sslcert, sslpassword: the four ways in from the issue are refused with 28000.
SET ROLE iso_add;
SELECT peerpool.pool_add_node('sock', 'host=/var/run/postgresql port=5432 dbname=postgres');
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('peer_sock', 'host=/var/run/postgresql port=5433 user=postgres')$$) AS peer_socket;
SELECT peerpool.pool_add_node('pf', 'host=127.0.0.1 user=app password=x passfile=/etc/pgpass');
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('pgpass', 'host=127.0.0.1 port=5433 user=app')$$) AS pgpass;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('svc', 'service=prod password=x')$$) AS service;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('key', 'host=h password=x sslkey=/k')$$) AS sslkey;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('crt', 'host=h password=x sslcert=/c')$$) AS sslcert;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('sslpw', 'host=h password=x sslpassword=y')$$) AS sslpassword;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('empty_pw', 'host=h user=app password=')$$) AS empty_password;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri_nopw', 'postgresql://app@127.0.0.1/postgres')$$) AS uri_no_password;
-- The refusal names the keyword, never a value.
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('pf2', 'host=h password=hunter2 passfile=/secret/file')$$) !~ 'hunter2|secret'
       AS no_value_quoted;
-- With a password it is accepted, and the caller owns the conninfo.
SELECT peerpool.pool_add_node('byadd', 'host=127.0.0.1 port=1 user=app password=s3cret');
SELECT peerpool.pool_add_node('byadd_uri', 'postgresql://app:s3cret@127.0.0.1:1/postgres', enabled => false);
RESET ROLE;
SELECT node_name, conninfo, conninfo_owner, password_required FROM peerpool.nodes ORDER BY node_name;

-- A superuser may register anything (a delegation, as with a SECURITY DEFINER function).
SELECT peerpool.pool_add_node('bysuper', 'host=/var/run/postgresql port=1 dbname=postgres', enabled => false);
SELECT node_name, conninfo_owner = current_user::regrole AS owned_by_me, password_required
  FROM peerpool.nodes WHERE node_name = 'bysuper';

-- ---- Altering: setting the conninfo makes the caller its owner -------------------------
SET ROLE iso_add;
-- Other settings of a superuser's node leave its owner (and its exemption) alone ...
SELECT peerpool.pool_alter_node('bysuper', weight => 7);
RESET ROLE;
SELECT node_name, conninfo_owner = current_user::regrole AS owned_by_me, password_required, weight
  FROM peerpool.nodes WHERE node_name = 'bysuper';
SET ROLE iso_add;
-- ... but a non-superuser cannot set a passwordless conninfo on it ...
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('bysuper', conninfo => 'host=/var/run/postgresql port=2')$$) AS alter_no_password;
-- ... and one with a password makes the node theirs, subject to the rule.
SELECT peerpool.pool_alter_node('bysuper', conninfo => 'host=127.0.0.1 port=2 user=app password=pw');
RESET ROLE;
SELECT node_name, conninfo_owner, password_required FROM peerpool.nodes WHERE node_name = 'bysuper';
-- A superuser setting the conninfo takes it back.
SELECT peerpool.pool_alter_node('bysuper', conninfo => 'host=/var/run/postgresql port=1');
SELECT node_name, conninfo_owner = current_user::regrole AS owned_by_me, password_required
  FROM peerpool.nodes WHERE node_name = 'bysuper';
-- A superuser who SET ROLE to a non-superuser acts as that role.
SET ROLE iso_add;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('bysuper', conninfo => 'host=/tmp')$$) AS as_set_role;
RESET ROLE;

-- Losing superuser (or being dropped) makes the rule apply from the next registry load.
CREATE ROLE iso_super SUPERUSER;
SET ROLE iso_super;
SELECT peerpool.pool_add_node('bysuper2', 'host=/var/run/postgresql port=1', enabled => false);
RESET ROLE;
SELECT node_name, conninfo_owner, password_required FROM peerpool.nodes WHERE node_name = 'bysuper2';
ALTER ROLE iso_super NOSUPERUSER;
SELECT node_name, conninfo_owner, password_required FROM peerpool.nodes WHERE node_name = 'bysuper2';
DROP ROLE iso_super;
SELECT node_name, conninfo_owner IS NOT NULL AS owner_kept, password_required
  FROM peerpool.nodes WHERE node_name = 'bysuper2';

-- Direct DML cannot dodge the record: whoever sets the conninfo owns it.
GRANT INSERT, UPDATE, SELECT ON peerpool.node TO iso_other;
SET ROLE iso_other;
INSERT INTO peerpool.node (node_name, conninfo, enabled, conninfo_owner)
VALUES ('dml', 'host=/tmp', false, (SELECT oid FROM pg_roles WHERE rolsuper ORDER BY oid LIMIT 1)::regrole);
UPDATE peerpool.node SET conninfo_owner = (SELECT oid FROM pg_roles WHERE rolsuper ORDER BY oid LIMIT 1)::regrole
 WHERE node_name = 'dml';
RESET ROLE;
SELECT node_name, conninfo_owner, password_required FROM peerpool.nodes WHERE node_name = 'dml';
-- A superuser's DML takes the conninfo over unless it names the owner (as a restore does).
UPDATE peerpool.node SET conninfo = 'host=/tmp port=2' WHERE node_name = 'dml';
SELECT node_name, conninfo_owner = current_user::regrole AS owned_by_me FROM peerpool.nodes WHERE node_name = 'dml';
UPDATE peerpool.node SET conninfo_owner = 'iso_other' WHERE node_name = 'dml';
SELECT node_name, conninfo_owner FROM peerpool.nodes WHERE node_name = 'dml';
REVOKE ALL ON peerpool.node FROM iso_other;

-- ---- URIs libpq would misread (22023, never quoting the password) ----------------------
SELECT peerpool.pool_add_node('uri1', 'postgresql://app:XSE/CRET9@127.0.0.1:5432/postgres');
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri2', 'postgresql://app:1234/CRET9@127.0.0.1:5432/postgres')$$) AS digits_then_slash;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri3', 'postgresql://app:p@ss@127.0.0.1/postgres')$$) AS at_sign;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri4', 'postgresql://app:se?cr@t@127.0.0.1/postgres')$$) AS question_then_at;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri5', 'postgresql://app:se#cr/t@127.0.0.1/postgres')$$) AS hash_then_slash;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri6', 'postgres://app:pw@h1:5432,h2:54x/postgres')$$) AS bad_second_port;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('byadd', conninfo => 'postgresql://app:XSE/CRET9@127.0.0.1/postgres')$$) AS alter_uri;
-- A '"' in the password does not confuse the masking of libpq's message: nothing after it.
SELECT peerpool.pool_add_node('uri7', 'postgresql://app:pa"ss%zz@127.0.0.1/postgres');
SELECT peerpool.pool_add_node('kv1', 'host=127.0.0.1 pass"word=secret');
-- Percent-encoded, the same passwords are fine; libpq reads '?' and '#' after the user name.
SELECT peerpool.pool_add_node('uri_ok', 'postgresql://app:XSE%2FCRET9%40x@127.0.0.1:5432/postgres', enabled => false);
SELECT peerpool.pool_add_node('uri_ok2', 'postgresql://app:se?cr%23et@127.0.0.1/postgres', enabled => false);
-- A URI that sets nothing would connect to the local server with libpq's defaults.
SELECT peerpool.pool_add_node('uri_empty', 'postgresql://');
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('uri_empty2', 'postgres://')$$) AS postgres_scheme;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('kv_empty', 'host=''''')$$) AS empty_values;
SELECT node_name, conninfo FROM peerpool.nodes WHERE node_name LIKE 'uri%' ORDER BY node_name;

-- ---- Bounds (SPEC section 2), in the functions and in the table ------------------------
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('b1', 'host=/tmp', max_connections => 1001)$$) AS max_1001;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('b1', 'host=/tmp', max_connections => 2147483647)$$) AS max_huge;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('b1', 'host=/tmp', weight => 1000001)$$) AS weight_1000001;
SELECT pg_temp.try($$SELECT peerpool.pool_add_node('b1', 'host=/tmp', min_connections => 1001, max_connections => 1000)$$) AS min_over_max;
SELECT peerpool.pool_add_node('b1', 'host=/tmp', min_connections => 0, max_connections => 1000,
                              weight => 1000000, enabled => false);
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('b1', max_connections => 1001)$$) AS alter_max_1001;
SELECT pg_temp.try($$SELECT peerpool.pool_alter_node('b1', weight => 2147483647)$$) AS alter_weight_huge;
SELECT pg_temp.try($$UPDATE peerpool.node SET max_connections = 1001 WHERE node_name = 'b1'$$) AS dml_max;
SELECT pg_temp.try($$UPDATE peerpool.node SET weight = 1000001 WHERE node_name = 'b1'$$) AS dml_weight;
SELECT node_name, min_connections, max_connections, weight FROM peerpool.nodes WHERE node_name = 'b1';

-- ---- peerpool.query_timeout: lowered by anyone, raised or disabled by superusers -------
GRANT EXECUTE ON FUNCTION peerpool.parallel_query(text, text[], integer) TO iso_other;
SET ROLE iso_other;
SHOW peerpool.query_timeout;
SET peerpool.query_timeout = '10s';
SET peerpool.query_timeout = '30s';
SET peerpool.query_timeout = '31s';
SET peerpool.query_timeout = 0;
SELECT pg_temp.try($$SELECT set_config('peerpool.query_timeout', '1h', false)$$) AS set_config;
SELECT pg_temp.try($$ALTER ROLE iso_other SET peerpool.query_timeout = 0$$) AS alter_role_self;
SHOW peerpool.query_timeout;
-- timeout_ms: the same limit (nothing is sent to any node).
SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['nope'], timeout_ms => 0);
SELECT pg_temp.try($$SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['nope'], timeout_ms => 30001)$$) AS timeout_ms_above;
-- At the limit is fine (the call then fails for the unknown node, 42704, as it should).
SELECT split_part(pg_temp.try($$SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['nope'], timeout_ms => 30000)$$), ':', 1)
       AS timeout_ms_at_limit;
RESET peerpool.query_timeout;
RESET ROLE;
-- A superuser may raise or disable it; that is then the limit for the rest of the session,
-- also after SET ROLE.
SET peerpool.query_timeout = 0;
SET ROLE iso_other;
SET peerpool.query_timeout = '2h';
SELECT split_part(pg_temp.try($$SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['nope'], timeout_ms => 0)$$), ':', 1)
       AS after_superuser_disabled;
RESET ROLE;
RESET peerpool.query_timeout;
SET ROLE iso_other;
SELECT pg_temp.try($$SET peerpool.query_timeout = 0$$) AS after_reset;
RESET ROLE;
-- A superuser's lower value is a lower limit.
SET peerpool.query_timeout = '5s';
SET ROLE iso_other;
SELECT pg_temp.try($$SET peerpool.query_timeout = '6s'$$) AS above_superuser_5s;
RESET ROLE;
RESET peerpool.query_timeout;

-- ---- peerpool.notify_reason: set in the server configuration only ----------------------
SHOW peerpool.notify_reason;
SET peerpool.notify_reason = off;

-- Clean up.
SELECT peerpool.pool_remove_node(node_name) FROM peerpool.node ORDER BY node_name;
REVOKE ALL ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean),
                       peerpool.pool_alter_node(text, text, integer, integer, text, integer, boolean),
                       peerpool.pool_remove_node(text)
  FROM iso_add;
REVOKE ALL ON FUNCTION peerpool.parallel_query(text, text[], integer) FROM iso_other;
REVOKE ALL ON SCHEMA peerpool FROM iso_add, iso_other;
DROP ROLE iso_add, iso_other;
