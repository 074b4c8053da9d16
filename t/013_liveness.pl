# Copyright (c) pg_peerpool contributors
#
# "The view must not say healthy while nobody is checking" (issue 10): while the pool manager
# is hung (SIGSTOP), terminated or restarting, peerpool.pool_manager says so and every
# peerpool.node_health row is marked stale, although its state is still the last one
# published. The pool manager wakes at least once a second to publish its heartbeat, even
# with nothing to do.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use PeerpoolFleet;

my @frozen;
END { PeerpoolFleet::thaw(@frozen) if @frozen; }

my $coord = PeerpoolFleet::coordinator('coord',
	conf => "peerpool.health_check_interval = '200ms'\n"
	  . "peerpool.degraded_latency = '4s'");    # a busy machine must not degrade the peer
my ($peer) = PeerpoolFleet::peers(1);

my $manager_sql =
  'SELECT pid, state, started_at IS NOT NULL, last_heartbeat IS NOT NULL, restarts, stopped_at IS NULL FROM peerpool.pool_manager';

ok( defined PeerpoolFleet::wait_until($coord,
		"SELECT state = 'running' FROM peerpool.pool_manager"),
	'the pool manager is running');
my ($worker) = PeerpoolFleet::worker_pids($coord);
is($coord->safe_psql('postgres', $manager_sql),
	"$worker|running|t|t|0|t", 'pool_manager: its pid, running, started, no restart, never stopped');

# An idle pool manager (no nodes: nothing else would wake it for 10 s) still publishes its
# heartbeat at least once a second.
my $max_age = 0;
my $until = time + 3;
while (time < $until)
{
	my $age = $coord->safe_psql('postgres',
		'SELECT heartbeat_age_ms FROM peerpool.pool_manager');
	$max_age = $age if $age > $max_age;
	usleep(50_000);
}
note sprintf('idle: oldest heartbeat seen over 3 s: %.0f ms', $max_age);
cmp_ok($max_age, '<', 2500, 'idle: the heartbeat is never much older than a second');

PeerpoolFleet::register($coord, $peer);
ok( defined PeerpoolFleet::wait_for_health($coord,
		"count(*) = 1 AND bool_and(state = 'healthy') AND bool_and(NOT stale)"),
	'the peer is healthy and not stale');

# Hung: SIGSTOP the pool manager. The node's row still says healthy (the last state it
# published), but marked stale, and pool_manager says 'not responding'.
my $t0 = time;
kill('STOP', $worker) == 1 or die "SIGSTOP $worker: $!";
@frozen = ($worker);
my $elapsed = PeerpoolFleet::wait_until($coord,
	"SELECT state = 'not responding' AND pid = $worker FROM peerpool.pool_manager",
	start => $t0);
PeerpoolFleet::timed_ok($elapsed, 10, 'SIGSTOP: pool_manager says not responding');
is( $coord->safe_psql('postgres',
		"SELECT state || ' stale=' || stale FROM peerpool.node_health"),
	'healthy stale=true',
	'SIGSTOP: node_health keeps the last state, marked stale');
cmp_ok(
	$coord->safe_psql('postgres',
		'SELECT heartbeat_age_ms FROM peerpool.pool_manager'),
	'>', 5000, 'SIGSTOP: the heartbeat age is reported');

PeerpoolFleet::thaw(@frozen);
@frozen = ();
$elapsed = PeerpoolFleet::wait_until($coord,
	"SELECT state = 'running' AND pid = $worker AND restarts = 0 FROM peerpool.pool_manager");
PeerpoolFleet::timed_ok($elapsed, 5, 'SIGCONT: running again, same process');
ok( defined PeerpoolFleet::wait_for_health($coord,
		"count(*) = 1 AND bool_and(state = 'healthy') AND bool_and(NOT stale)"),
	'SIGCONT: node_health is current again');

# Terminated: the postmaster restarts the pool manager after about a second. Watched from
# inside the server: while none runs, pool_manager says 'stopped' and the node's row (still
# the old one) is stale.
my $session = PeerpoolFleet::session($coord);
PeerpoolFleet::watch_start($session,
	"SELECT (SELECT state = 'stopped' AND pid IS NULL AND stopped_at IS NOT NULL FROM peerpool.pool_manager)"
	  . " AND (SELECT count(*) = 1 AND bool_and(stale) FROM peerpool.node_health)",
	30);
$coord->safe_psql('postgres', "SELECT pg_terminate_backend($worker)");
ok(defined PeerpoolFleet::watch_finish($session),
	'terminated: pool_manager said stopped and node_health was stale');
$session->quit;

$elapsed = PeerpoolFleet::wait_until($coord,
	"SELECT state = 'running' AND pid <> $worker AND restarts = 1 AND started_at > stopped_at FROM peerpool.pool_manager"
);
ok(defined $elapsed, 'restarted: a new pool manager is running, one restart counted');
ok( defined PeerpoolFleet::wait_for_health($coord,
		"count(*) = 1 AND bool_and(state = 'healthy') AND bool_and(NOT stale)"),
	'restarted: the node is checked again, not stale');

# Monitoring roles read both views (the stale column needs _pool_manager too).
$coord->safe_psql('postgres', 'CREATE ROLE watcher LOGIN IN ROLE pg_monitor');
is( $coord->safe_psql('postgres',
		"SET ROLE watcher; SELECT m.state || ' ' || h.stale FROM peerpool.pool_manager m, peerpool.node_health h"
	),
	'running false',
	'a pg_monitor member reads pool_manager and node_health.stale');
my ($ret, $out, $err) = $coord->psql('postgres',
	'CREATE ROLE nobody_special LOGIN; SET ROLE nobody_special; SELECT * FROM peerpool.pool_manager');
like($err, qr/permission denied/, 'others may not');

PeerpoolFleet::check_logs($coord, $peer);
done_testing();
