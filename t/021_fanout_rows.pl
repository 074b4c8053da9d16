# Copyright (c) pg_peerpool contributors

# parallel_query_rows() and parallel_query() against a real fleet (SPEC section 5, issue 9):
# every node's rows typed, in about the time of the slowest node; a slow node fails at the
# per-node deadline and its remote query is cancelled; on_error => 'error' cancels the other
# nodes' queries at once; a statement timeout cancels them all; one node's json that jsonb
# cannot hold, or repeated column names, cost no other node anything.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
EOC
my @peers = PeerpoolFleet::peers(3);
my ($p1, $p2, $p3) = @peers;
PeerpoolFleet::register($coord, @peers);
ok( defined PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 3"),
	'three peers healthy');

# SQL that is true on one peer only (each listens on its own port).
sub on
{
	my ($peer) = @_;
	return 'inet_server_port() = ' . $peer->port;
}

# Remote sessions of ours running a statement that contains $what, on a peer.
sub running
{
	my ($peer, $what) = @_;
	return $peer->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_peerpool'"
		  . " AND state = 'active' AND query LIKE " . PeerpoolFleet::quote("%$what%"));
}

# Waits until no remote session of ours on $peer runs $what; returns the seconds it took.
sub cancelled_within
{
	my ($peer, $what, $start) = @_;
	return PeerpoolFleet::wait_until($peer,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool'"
		  . " AND state = 'active' AND query LIKE " . PeerpoolFleet::quote("%$what%"),
		start => $start, timeout => 10);
}

# ---- typed rows from every node, in about the time of the slowest ------------------------

my ($secs, $out) = PeerpoolFleet::timed_psql($coord, q{
	SELECT node, n, ok, lsn > '0/0' FROM peerpool.parallel_query_rows(
	    'SELECT g, g % 2 = 0, pg_current_wal_lsn() FROM generate_series(1, 2) g, pg_sleep(1)')
	    AS t(node text, n int, ok boolean, lsn pg_lsn)
	 ORDER BY node, n});
is($out,
	join("\n", map { ($_->name . "|1|f|t", $_->name . "|2|t|t") } @peers),
	'every node\'s rows, typed (int, boolean, pg_lsn), node name first');
note sprintf('three nodes sleeping 1 s each: %.3f s', $secs);
cmp_ok($secs, '<', 2.5, 'the nodes run at once (about 1 s, not 3 s)');

# ---- per-node deadline ------------------------------------------------------------------

my $slow = 'pg_sleep(30) /* fidelity-deadline */';
my $start = time;
my ($rc, $stdout, $stderr) = $coord->psql('postgres', sprintf(q{
	SELECT node FROM peerpool.parallel_query_rows(
	    'SELECT CASE WHEN %s THEN %s::text ELSE ''quick'' END', timeout_ms => 500)
	    AS t(node text, x text) ORDER BY node}, on($p2), $slow));
$secs = time - $start;
is($stdout, join("\n", $p1->name, $p3->name), 'a slow node is left out at the deadline');
like($stderr, qr/WARNING:  timeout: node "peer2" did not answer within 500 ms \[SQLSTATE 57014\]/,
	'... with a warning naming it');
note sprintf('call with a 500 ms per-node deadline: %.3f s', $secs);
cmp_ok($secs, '<', 5, '... and the call returns at about the deadline');
my $gone = cancelled_within($p2, 'fidelity-deadline', $start);
PeerpoolFleet::timed_ok($gone, 5, 'the timed-out remote query is cancelled on the peer');

# ---- on_error => 'error' cancels the other nodes -------------------------------------------

my $other = 'pg_sleep(30) /* fidelity-abort */';
$start = time;
($rc, $stdout, $stderr) = $coord->psql('postgres', sprintf(q{
	SELECT * FROM peerpool.parallel_query_rows(
	    'SELECT CASE WHEN %s THEN (1 / (inet_server_port() - inet_server_port()))::text ELSE %s::text END',
	    on_error => 'error') AS t(node text, x text)}, on($p1), $other));
$secs = time - $start;
like($stderr, qr/ERROR:  node "peer1": division by zero/, 'on_error => error raises the node\'s error');
note sprintf('error raised after %.3f s', $secs);
cmp_ok($secs, '<', 5, '... without waiting for the other nodes');
for my $peer ($p2, $p3)
{
	my $t = cancelled_within($peer, 'fidelity-abort', $start);
	PeerpoolFleet::timed_ok($t, 5, $peer->name . ': its query is cancelled');
}

# ---- a statement timeout cancels every node's query -----------------------------------------

$start = time;
($rc, $stdout, $stderr) = $coord->psql('postgres', q{
	SET statement_timeout = '500ms';
	SELECT * FROM peerpool.parallel_query_rows('SELECT pg_sleep(30) /* fidelity-stmt */') AS t(node text, x text)});
like($stderr, qr/canceling statement due to statement timeout/, 'statement_timeout cancels the call');
for my $peer (@peers)
{
	my $t = cancelled_within($peer, 'fidelity-stmt', $start);
	PeerpoolFleet::timed_ok($t, 3, $peer->name . ': its query is cancelled soon after the 0.5 s timeout');
}
is( $coord->safe_psql('postgres',
		q{SELECT count(*) FROM peerpool.parallel_query_rows('SELECT 1') AS t(node text, x int)}),
	'3', 'the pools serve the next call');

# ---- one node's json, another's columns -----------------------------------------------------

$out = $coord->safe_psql('postgres', sprintf(q{
	SELECT node_name || ' ' || success || ' ' || coalesce(result::text, error)
	  FROM peerpool.parallel_query($$SELECT CASE WHEN %s THEN '"a\u0000b"'::json ELSE '1'::json END AS j,
	                                  1 AS x, 2 AS x$$)
	 ORDER BY node_name}, on($p2)));
is($out, join("\n",
		'peer1 true [{"j": 1, "x": 1, "x_2": 2}]',
		'peer2 false node "peer2": column "j": unsupported Unicode escape sequence (\u0000 cannot be converted to text.) [SQLSTATE 22P05]',
		'peer3 true [{"j": 1, "x": 1, "x_2": 2}]'),
	'json that jsonb cannot hold fails its node only; repeated names keep every value');

PeerpoolFleet::check_logs($coord, @peers);
done_testing();
