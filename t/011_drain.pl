# Copyright (c) pg_peerpool contributors

# peerpool.drain_timeout (SPEC sections 2 and 7): a removed node's in-flight queries may
# finish for up to drain_timeout; then they are cancelled on the node, their callers get an
# error, and the node's connections close -- no remote session is left behind.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my $drain_ms = 700;
my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<"EOC");
peerpool.drain_timeout = '${drain_ms}ms'
peerpool.health_check_interval = '300ms'
EOC
my ($peer) = PeerpoolFleet::peers(1);
my $name = $peer->name;
PeerpoolFleet::register($coord, $peer);
ok(defined PeerpoolFleet::wait_for_health($coord,
		"bool_and(state = 'healthy') FILTER (WHERE node_name = '$name')", 10),
	'the node is healthy');

my $sleeping = "SELECT count(*) = 1 FROM pg_stat_activity "
  . "WHERE application_name = 'pg_peerpool' AND query = 'SELECT pg_sleep(30)' AND state = 'active'";

# A query that finishes within drain_timeout completes normally.
my $short = PeerpoolFleet::psql_start($coord,
	[ "SELECT * FROM peerpool.pool_query('SELECT pg_sleep(0.3), 1', '$name') AS t(s text, x int)" ]);
ok(defined PeerpoolFleet::wait_until($peer,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'pg_peerpool' "
		  . "AND query LIKE 'SELECT pg_sleep(0.3)%' AND state = 'active'", timeout => 10),
	'the short query runs on the node');
$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('$name')");
my ($rc, $out, $err) = PeerpoolFleet::psql_finish($short);
is($rc, 0, 'a query that ends within drain_timeout completes after pool_remove_node') or diag $err;
is($out =~ s/\s+\z//r, '|1', 'and returns its row');
PeerpoolFleet::wait_until($peer, "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool'",
	timeout => 10);

# A query that outlives drain_timeout is cancelled at the deadline.
PeerpoolFleet::register($coord, $peer);
ok(defined PeerpoolFleet::wait_for_health($coord,
		"bool_and(state = 'healthy') FILTER (WHERE node_name = '$name')", 10),
	'the node is registered again and healthy');
my $long = PeerpoolFleet::psql_start($coord,
	[ "SELECT * FROM peerpool.pool_query('SELECT pg_sleep(30)', '$name') AS t(s text)" ]);
ok(defined PeerpoolFleet::wait_until($peer, $sleeping, timeout => 10), 'the long query runs on the node');
my $t_remove = time;
$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('$name')");
($rc, $out, $err) = PeerpoolFleet::psql_finish($long);
my $caller_done = $long->{finished} - $t_remove;
isnt($rc, 0, 'the caller of the long query fails');
like($err, qr/08006: .*node removed; drain_timeout expired/, 'with the drain error (08006)');
cmp_ok($caller_done, '>=', $drain_ms / 1000 * 0.9, 'not before drain_timeout');
cmp_ok($caller_done, '<', $drain_ms / 1000 + 2, 'and soon after it');
note sprintf('caller failed %.1f ms after pool_remove_node (drain_timeout %d ms)', 1000 * $caller_done,
	$drain_ms);
my $gone = PeerpoolFleet::wait_until($peer,
	"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool'",
	timeout => 10, start => $t_remove);
ok(defined $gone, 'no session of ours is left on the node (the remote query was cancelled)');
note sprintf('node free of our sessions %.1f ms after pool_remove_node', 1000 * ($gone // 0));
is($coord->safe_psql('postgres', "SELECT count(*) FROM peerpool.node_health WHERE node_name = '$name'"),
	'0', 'the node is gone from node_health');

PeerpoolFleet::check_logs($coord, $peer);
$coord->stop;
$peer->stop;
done_testing();
