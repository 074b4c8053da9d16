# Copyright (c) pg_peerpool contributors

# Session hygiene (SPEC sections 5 and 6; issue 8, finding 2): nothing one call leaves in the
# remote session -- role, search_path, temporary tables, advisory locks, prepared statements,
# LISTEN, statement_timeout -- is visible to a later call of another local role or to a health
# check. peerpool.reset_query (default DISCARD ALL) runs when the connection comes back; the
# health check is immune to session state whatever reset_query is, even '' (it pins its own
# timeouts, role, search_path and isolation level for the length of its query string).
# Every node has max_connections => 1, so callers and checks share one remote session.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use PeerpoolFleet;

my ($primary, $standby) = PeerpoolFleet::streaming_pair();
$primary->safe_psql('postgres', <<'EOS');
CREATE ROLE lowpriv;
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO lowpriv;
EOS
$primary->wait_for_catchup($standby);

# Checks only when asked for (pool_check_health), so the test decides what each one follows.
my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '1h'
EOC
my $superuser = getpwuid($<) // $ENV{USER};
for my $n ([ 'prim', $primary ], [ 'stby', $standby ])
{
	$coord->safe_psql('postgres', sprintf(
		"SELECT peerpool.pool_add_node('%s', %s, min_connections => 1, max_connections => 1)",
		$n->[0], PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($n->[1]))));
}
$coord->safe_psql('postgres', <<'EOS');
CREATE ROLE caller_a LOGIN;
CREATE ROLE caller_b LOGIN;
GRANT USAGE ON SCHEMA peerpool TO caller_a, caller_b;
GRANT EXECUTE ON FUNCTION peerpool.parallel_query(text, text[], integer),
                          peerpool.pool_check_health(text) TO caller_a, caller_b;
EOS
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 30),
	30, 'both nodes healthy');

# One parallel_query call as a local role on one node: (success, result or error).
sub call
{
	my ($role, $node, $sql) = @_;
	my $out = $coord->safe_psql('postgres', sprintf(
		"SET ROLE %s; SELECT success || '|' || coalesce(result::text, error) "
		  . "FROM peerpool.parallel_query(%s, ARRAY['%s'])",
		$role, PeerpoolFleet::quote($sql), $node));
	my ($ok, $rest) = split /\|/, $out, 2;
	return ($ok eq 'true', $rest);
}

# A health check now, as a caller would ask for it: "state|consecutive_failures", and the
# last error when the check failed.
sub check_now
{
	my ($node) = @_;
	return $coord->safe_psql('postgres',
		"SELECT state || '|' || consecutive_failures || CASE WHEN consecutive_failures > 0 "
		  . "THEN '|' || coalesce(last_sqlstate, '') || '|' || coalesce(last_error, '') ELSE '' END "
		  . "FROM peerpool.pool_check_health('$node')");
}

my $probe = q{SELECT pg_backend_pid() AS pid, current_user AS usr,
       current_setting('search_path') AS search_path,
       to_regclass('leak_t') IS NULL AS no_temp_table,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory_locks,
       (SELECT count(*) FROM pg_prepared_statements) AS prepared,
       (SELECT count(*) FROM pg_listening_channels()) AS listening,
       current_setting('statement_timeout') AS statement_timeout};

# ---- Caller A's list from the issue, then caller B ----------------------------------------
my ($ok, $res) = call('caller_a', 'prim', q{SET ROLE lowpriv; SET search_path = evil, public;
CREATE TEMP TABLE leak_t AS SELECT 'planted by A'::text x; SELECT pg_advisory_lock(1);
PREPARE p AS SELECT 42; LISTEN c; SELECT pg_backend_pid() AS pid_a});
ok($ok, 'caller A plants role, search_path, temp table, lock, prepared statement, LISTEN') or diag $res;
my ($pid_a) = $res =~ /"pid_a": (\d+)/;
($ok, $res) = call('caller_b', 'prim', $probe);
ok($ok, 'caller B runs after A') or diag $res;
note "caller B sees: $res";
my ($pid_b) = $res =~ /"pid": (\d+)/;
is($pid_b, $pid_a, 'B ran in the same remote session as A (one connection)');
like($res, qr/"usr": "\Q$superuser\E"/, "B runs as the node's user, not A's role");
like($res, qr/"search_path": "\\"\$user\\", public"/, "B has the default search_path, not A's");
like($res, qr/"no_temp_table": true/, "B cannot see A's temporary table");
like($res, qr/"advisory_locks": 0/, "B holds none of A's advisory locks");
like($res, qr/"prepared": 0/, "B sees none of A's prepared statements");
like($res, qr/"listening": 0/, "B does not listen where A did");
is($primary->safe_psql('postgres', "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
	'0', "A's advisory lock is gone on the node");
like(check_now('prim'), qr/^healthy\|0$/, 'a health check after A succeeds');

# ---- statement_timeout = 1ms by A fails neither B nor the node ----------------------------
($ok, $res) = call('caller_a', 'prim', q{SET statement_timeout = '1ms'});
ok($ok, "caller A sets statement_timeout = '1ms'") or diag $res;
($ok, $res) = call('caller_b', 'prim', q{SELECT pg_sleep(0.05) AS slept, current_setting('statement_timeout') AS st});
ok($ok, 'caller B then runs a 50 ms query') or diag $res;
like($res, qr/"st": "0"/, "B does not inherit A's statement_timeout");
like(check_now('prim'), qr/^healthy\|0$/, "the node's check is not cancelled");

# ---- The check alone is immune, whatever reset_query is: also '' ---------------------------
PeerpoolFleet::set_gucs($coord, 'peerpool.reset_query' => '');
# The reload reached the pool manager once a setting survives from one call to the next.
# (The LATERAL reference makes the SET call run first.)
my $applied = PeerpoolFleet::wait_until($coord,
	q{SELECT bool_and(q.result::text LIKE '%"m": "kept"%') FROM}
	  . q{ (SELECT count(*) AS n FROM peerpool.parallel_query('SET application_name = ''kept''', ARRAY['prim'])) s,}
	  . q{ LATERAL peerpool.parallel_query('SELECT current_setting(''application_name'') AS m'}
	  . q{ || CASE WHEN s.n >= 0 THEN '' END, ARRAY['prim']) q},
	timeout => 30);
PeerpoolFleet::timed_ok($applied, 30, "reset_query = '': session state now outlives a call");

# On the standby, a caller's default_transaction_isolation = serializable makes every later
# query in that session fail ("cannot use serializable mode in a hot standby"), unless the
# query pins its own isolation level, as the check does.
for my $node ('prim', 'stby')
{
	($ok, $res) = call('caller_a', $node, q{SET default_transaction_isolation = 'serializable';
SET ROLE lowpriv; SET search_path = evil; SET lock_timeout = '1ms'; SET statement_timeout = '1ms'});
	ok($ok, "$node: caller A leaves serializable, role, search_path and 1 ms timeouts behind")
	  or diag $res;
	my @checks = map { check_now($node) } 1 .. 3;
	is(join(' ', map { /^healthy\|0$/ ? 'ok' : $_ } @checks), 'ok ok ok',
		"$node: three health checks in that session succeed with reset_query = ''");
}
is($coord->safe_psql('postgres',
		"SELECT string_agg(node_name || ':' || state, ',' ORDER BY node_name) FROM peerpool.node_health"),
	'prim:healthy,stby:healthy', 'both nodes stay healthy');

PeerpoolFleet::set_gucs($coord, 'peerpool.reset_query' => undef);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_until($coord,
		"SELECT bool_and(success) FROM peerpool.parallel_query('SELECT 1', ARRAY['prim', 'stby'])",
		timeout => 30),
	30, 'default reset_query back: both nodes serve again');

PeerpoolFleet::check_logs($coord, $primary, $standby);
$_->stop for ($coord, $standby, $primary);
done_testing();
