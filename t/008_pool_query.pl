# Copyright (c) pg_peerpool contributors

# pool_query() routing against a primary, its streaming standby and another primary (SPEC
# section 5): 'write' goes to a healthy primary, 'read' prefers the standby unless
# peerpool.read_write_split is off, 'standby' only to a standby; round_robin alternates,
# weighted never picks a weight-0 node, random does not alternate; remote errors keep their
# SQLSTATE, detail and hint with the node's name; a column list that does not fit is 42804;
# with no healthy primary, 'write' is 08006 with a reason per node while reads go on.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<'EOC');
peerpool.health_check_interval = '200ms'
peerpool.health_check_timeout = '1s'
peerpool.degraded_latency = '1s'
peerpool.degraded_lag = '30s'
peerpool.unhealthy_lag = '60s'
EOC

# A primary that allows streaming and a standby streaming from it, both on 127.0.0.1 too.
my ($primary, $standby) = PeerpoolFleet::streaming_pair();
$primary->safe_psql('postgres', 'CREATE TABLE t (i int); INSERT INTO t VALUES (1)');
$primary->wait_for_catchup($standby);

# A second, unrelated primary ("other1").
my ($other) = PeerpoolFleet::peers(1, prefix => 'other');
my %by_port = map { $_->port => $_->name } ($primary, $standby, $other);

# Calls go through one persistent session.
my $bs = $coord->background_psql('postgres');

# One pool_query call: its single value.
sub one
{
	my ($sql, $target, $type) = @_;
	return $bs->query_safe(
		sprintf('SELECT * FROM peerpool.pool_query(%s, %s) AS t(v %s)',
			PeerpoolFleet::quote($sql), PeerpoolFleet::quote($target), $type));
}

# $n calls of pool_query in one statement (one call per row of a LATERAL join); returns
# the node names that answered, in call order.
sub names_of_calls
{
	my ($target, $n, $session) = @_;
	my $out = ($session // $bs)->query_safe(
		sprintf(
			q{SELECT string_agg(p::text, ',' ORDER BY g) FROM generate_series(1, %d) g,
  LATERAL peerpool.pool_query('SELECT inet_server_port() WHERE ' || g || ' > 0', %s) AS t(p int)},
			$n, PeerpoolFleet::quote($target)));
	return map { $by_port{$_} // "port $_" } split /,/, $out;
}

# A query for wait_until on the coordinator: true when $n calls in a row to $target
# satisfy $cond, a boolean expression over "ports", the array of the answering ports.
sub calls_condition
{
	my ($target, $n, $cond) = @_;
	return sprintf(
		q{SELECT (%s) FROM (SELECT array_agg(p ORDER BY g) AS ports FROM generate_series(1, %d) g,
  LATERAL peerpool.pool_query('SELECT inet_server_port() WHERE ' || g || ' > 0', %s) AS t(p int)) s},
		$cond, $n, PeerpoolFleet::quote($target));
}

sub alternates
{
	my @seq = @_;
	for my $i (1 .. $#seq)
	{
		return 0 if $seq[$i] eq $seq[ $i - 1 ];
	}
	return 1;
}

sub count_of
{
	my ($name, @seq) = @_;
	return scalar grep { $_ eq $name } @seq;
}

# ---------------------------------------------------------------------------------------
# Roles detected: primary and standby.

my $t0 = time;
PeerpoolFleet::register($coord, $primary, $standby);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health(
		$coord,
		"count(*) FILTER (WHERE node_name = 'primary' AND state = 'healthy' AND role = 'primary') = 1"
		  . " AND count(*) FILTER (WHERE node_name = 'standby' AND state = 'healthy' AND role = 'standby') = 1",
		15, start => $t0),
	10, 'primary and standby healthy with their detected roles');

# ---------------------------------------------------------------------------------------
# Targets with read_write_split on (the default).

is(one('SELECT pg_is_in_recovery()', 'write', 'boolean'), 'f', "'write' runs on the primary");
is(one('SELECT pg_is_in_recovery()', 'standby', 'boolean'), 't', "'standby' runs on the standby");
is(one('SELECT pg_is_in_recovery()', 'primary', 'boolean'), 'f', 'a node name runs on that node');
my @reads = names_of_calls('read', 6);
note "6 x 'read' with read_write_split on: @reads";
is_deeply(\@reads, [ ('standby') x 6 ], "'read' prefers the standby (6 calls)");
is( $bs->query_safe(q{SELECT string_agg(r::text, ',') FROM generate_series(1, 4) g,
  LATERAL peerpool.pool_query('SELECT pg_is_in_recovery() WHERE ' || g || ' > 0', 'read') AS t(r boolean)}),
	'true,true,true,true', "'read': pg_is_in_recovery() is true on every call");
my @writes = names_of_calls('write', 6);
is_deeply(\@writes, [ ('primary') x 6 ], "'write' only ever goes to the primary (6 calls)");

# read_write_split off (SIGHUP): reads go round robin over both.
PeerpoolFleet::set_gucs($coord, 'peerpool.read_write_split' => 'off');
my $applied = PeerpoolFleet::wait_until($coord,
	calls_condition('read', 4, '(SELECT count(DISTINCT p) FROM unnest(ports) p) = 2'), timeout => 10);
PeerpoolFleet::timed_ok($applied, 5, "read_write_split = off applied: 'read' reaches both nodes");
@reads = names_of_calls('read', 4);
note "4 x 'read' with read_write_split off: @reads";
is(count_of('primary', @reads) . ',' . count_of('standby', @reads), '2,2',
	"read_write_split off: 4 reads, 2 on each node");
ok(alternates(@reads), 'read_write_split off: round robin alternates');
is(one('SELECT pg_is_in_recovery()', 'write', 'boolean'), 'f', "'write' still only on the primary");

PeerpoolFleet::set_gucs($coord, 'peerpool.read_write_split' => undef);
$applied = PeerpoolFleet::wait_until($coord,
	calls_condition('read', 4, 'ports <@ ARRAY[' . $standby->port . ']'),
	timeout => 10);
PeerpoolFleet::timed_ok($applied, 5, "read_write_split back on: 'read' on the standby only");

# ---------------------------------------------------------------------------------------
# Load balancing over two primaries ('write').

PeerpoolFleet::register($coord, $other);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name = 'other1' AND state = 'healthy' AND role = 'primary') = 1",
		10),
	5, 'other1 healthy as a primary');

@writes = names_of_calls('write', 6);
note "6 x 'write' round_robin over two primaries: @writes";
is(count_of('primary', @writes) . ',' . count_of('other1', @writes), '3,3',
	'round_robin: 3 writes on each primary');
ok(alternates(@writes), 'round_robin: consecutive writes alternate');
@reads = names_of_calls('read', 4);
is_deeply(\@reads, [ ('standby') x 4 ], "'read' still prefers the standby with two primaries");

# Weight 0 means nothing to round_robin, but weighted never picks the node.
$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('other1', weight => 0)");
@writes = names_of_calls('write', 4);
note "4 x 'write' round_robin, other1 weight 0: @writes";
is(count_of('other1', @writes), 2, 'round_robin ignores the weight');

PeerpoolFleet::set_gucs($coord, 'peerpool.load_balance' => 'weighted');
$applied = PeerpoolFleet::wait_until($coord,
	calls_condition('write', 10, 'ports <@ ARRAY[' . $primary->port . ']'),
	timeout => 10);
PeerpoolFleet::timed_ok($applied, 5, 'load_balance = weighted applied');
@writes = names_of_calls('write', 20);
note "20 x 'write' weighted, other1 weight 0: @writes";
is(count_of('other1', @writes), 0, 'weighted: the weight-0 node is never picked (20 calls)');
is(count_of('primary', @writes), 20, 'weighted: all 20 calls on the weighted primary');

# random: both nodes, and not the strict alternation of round robin.
$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('other1', weight => 100)");
PeerpoolFleet::set_gucs($coord, 'peerpool.load_balance' => 'random');
$applied = PeerpoolFleet::wait_until(
	$coord,
	calls_condition(
		'write', 40,
		'(SELECT count(DISTINCT p) FROM unnest(ports) p) = 2'
		  . ' AND EXISTS (SELECT FROM generate_subscripts(ports, 1) i WHERE ports[i] = ports[i + 1])'
	),
	timeout => 10);
PeerpoolFleet::timed_ok($applied, 5, 'load_balance = random: 40 writes hit both primaries, not in strict alternation');

# least_connections and latency pick a primary for writes.
for my $strategy ('least_connections', 'latency')
{
	PeerpoolFleet::set_gucs($coord, 'peerpool.load_balance' => $strategy);
	@writes = names_of_calls('write', 4);
	is(scalar(grep { $_ eq 'primary' || $_ eq 'other1' } @writes), 4, "$strategy: writes go to primaries");
	note "4 x 'write' $strategy: @writes";
}
PeerpoolFleet::set_gucs($coord, 'peerpool.load_balance' => undef);

# ---------------------------------------------------------------------------------------
# Remote errors keep the remote SQLSTATE, detail and hint; the message names the node.

my ($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('SELECT 1/0', 'primary') AS t(a int);});
isnt($ret, 0, 'a remote error fails the call');
like($err, qr/ERROR:\s+22012: node "primary": division by zero/, 'remote division by zero: 22012, node named');
($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('CREATE TABLE nope (i int)', 'standby') AS t(a int);});
like($err, qr/ERROR:\s+25006: node "standby": cannot execute CREATE TABLE in a read-only transaction/,
	'a write on the standby: the standby\'s 25006');
($ret, $err) = PeerpoolFleet::psql_error($coord, <<'EOQ');
SELECT * FROM peerpool.pool_query($q$DO $x$ BEGIN RAISE EXCEPTION 'custom failure'
    USING ERRCODE = 'P0042', DETAIL = 'remote detail', HINT = 'remote hint'; END $x$$q$,
    'write') AS t(a int);
EOQ
like( $err,
	qr/ERROR:\s+P0042: node "(primary|other1)": custom failure\nDETAIL:\s+remote detail\nHINT:\s+remote hint/,
	'custom remote error: SQLSTATE, message, detail and hint');
note "remote error said:\n$err";

# The column definition list must fit the remote result.
($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('SELECT 1, 2', 'primary') AS t(a int);});
like($err, qr/ERROR:\s+42804: remote query result rowtype does not match/, 'two columns for one: 42804');
note "rowtype mismatch said:\n$err";
($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('SELECT 1', 'primary') AS t(a int, b int);});
like($err, qr/ERROR:\s+42804:/, 'one column for two: 42804');
($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('SELECT ''abc''', 'primary') AS t(a int);});
like($err, qr/ERROR:\s+22P02: invalid input syntax for type integer: "abc"/,
	'a value that does not convert: 22P02');
is($bs->query_safe(q{SELECT * FROM peerpool.pool_query('SELECT 1, ''x''', 'primary') AS t(a int, b text)}),
	'1|x', 'the session and the pool still work after the errors');

# ---------------------------------------------------------------------------------------
# No healthy primary: 'write' is 08006 with the reason of every node; reads go on.

$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('other1', enabled => false)");
$primary->stop('immediate');
my $t_stop = time;
my $down = PeerpoolFleet::wait_for_health($coord,
	"count(*) FILTER (WHERE node_name = 'primary' AND state IN ('unhealthy', 'reconnecting')) = 1"
	  . " AND count(*) FILTER (WHERE node_name = 'other1' AND state = 'disconnected') = 1",
	10, start => $t_stop);
PeerpoolFleet::timed_ok($down, 5, 'the primary is down and other1 disabled');
($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('SELECT 1', 'write') AS t(a int);});
isnt($ret, 0, "'write' without a healthy primary fails");
like($err, qr/ERROR:\s+08006: no node can serve target "write"/, "'write' without a primary: 08006");
like($err, qr/DETAIL:.*other1: disabled/s, 'the detail gives the disabled node\'s reason');
like($err, qr/DETAIL:.*primary: (unhealthy|reconnecting)/s, 'the detail gives the down primary\'s reason');
like($err, qr/DETAIL:.*standby: standby, not primary/s, 'the detail gives the standby\'s reason');
note "'write' without a primary said:\n$err";
($ret, $err) = PeerpoolFleet::psql_error($coord,
	q{SELECT * FROM peerpool.pool_query('SELECT 1', 'primary') AS t(a int);});
like($err, qr/ERROR:\s+08006: node "primary" cannot serve queries/, 'the down node by name: 08006');
is(one('SELECT pg_is_in_recovery()', 'read', 'boolean'), 't', "'read' still served by the standby");

# ---------------------------------------------------------------------------------------

$bs->quit;
PeerpoolFleet::check_logs($coord, $primary, $standby, $other);
$_->stop for ($coord, $standby, $primary, $other);

done_testing();
