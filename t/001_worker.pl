# Copyright (c) pg_peerpool contributors

# The pool manager worker: it runs, mirrors committed registry changes into shared memory
# within 1 s (SPEC section 2), ignores rolled-back ones, and rebuilds the mirror from the
# catalog after a restart and after a crash of the worker itself.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

# The states an enabled node with a live peer may show while this test looks: not started yet,
# opening its first connection, or serving. (Health transitions are 003_health.pl's subject.)
my @ENABLED_STATES = qw(disconnected connecting healthy degraded);
my $enabled_set    = join(', ', map { "'$_'" } @ENABLED_STATES);

my $worker = $PeerpoolFleet::WORKER_TYPE;

# Cluster.pm sets restart_after_crash = off; the SIGKILL test needs the postmaster's
# crash-restart cycle.
my $coord = PeerpoolFleet::coordinator('coord', conf => 'restart_after_crash = on');
my @peers = PeerpoolFleet::peers(3);
my ($p1, $p2, $p3) = map { $_->name } @peers;

# A wait finished in under 1 s (the registry contract); the measured time is noted.
sub within_1s
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return PeerpoolFleet::timed_ok($_[0], 1.0, $_[1]);
}

# One node's state in node_health ('' when absent).
sub state_of
{
	my ($name) = @_;
	return $coord->safe_psql('postgres',
		"SELECT state FROM peerpool.node_health WHERE node_name = '$name'");
}

# ---------------------------------------------------------------------------------------
# The worker is visible, connected to peerpool.database.

ok( PeerpoolFleet::wait_until(
		$coord,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = '$worker' AND datname = 'postgres'"
	),
	'one pool manager is running, connected to database postgres');

is($coord->safe_psql('postgres', 'SELECT count(*) FROM peerpool.node_health'),
	'0', 'node_health is empty before any registration');

# ---------------------------------------------------------------------------------------
# A committed pool_add_node shows in node_health within 1 s. Each change is timed from the
# return of its (autocommit) call to the row seen in node_health.

my $s = PeerpoolFleet::session($coord);
my %ci = map { $_->name => PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($_)) } @peers;

within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_add_node('$p1', $ci{$p1})",
		"count(*) FILTER (WHERE node_name = '$p1' AND state IN ($enabled_set)) = 1"),
	'pool_add_node applied');
is_deeply([ PeerpoolFleet::health_names($coord) ],
	[$p1], 'node_health lists exactly the registered node');

# ---------------------------------------------------------------------------------------
# pool_alter_node(enabled => false) makes the node disconnected; enabling it again is
# applied too.

# An enabled node that is not connected yet is "disconnected" too, so the disable is seen
# as a new state_since: disabling starts a new "disconnected" period.
note "state of $p1 while enabled: " . state_of($p1);
my $since = $coord->safe_psql('postgres',
	"SELECT state_since FROM peerpool.node_health WHERE node_name = '$p1'");
like($since, qr/^\d{4}-/, 'an enabled node has a state_since');
within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_alter_node('$p1', enabled => false)",
		"count(*) FILTER (WHERE node_name = '$p1' AND state = 'disconnected'"
		  . " AND state_since > '$since'::timestamptz) = 1"),
	'pool_alter_node(enabled => false) applied');
is($coord->safe_psql('postgres', "SELECT enabled FROM peerpool.nodes WHERE node_name = '$p1'"),
	'f', 'peerpool.nodes shows the node disabled');

within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_alter_node('$p1', enabled => true)",
		"count(*) FILTER (WHERE node_name = '$p1' AND state IN ($enabled_set)) = 1"),
	'pool_alter_node(enabled => true) applied');

# ---------------------------------------------------------------------------------------
# pool_remove_node makes the row disappear within 1 s.

within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_add_node('$p2', $ci{$p2})",
		"count(*) FILTER (WHERE node_name = '$p2') = 1"),
	'second pool_add_node applied');
within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_remove_node('$p1')",
		"count(*) FILTER (WHERE node_name = '$p1') = 0"),
	'pool_remove_node applied');
is_deeply([ PeerpoolFleet::health_names($coord) ],
	[$p2], 'only the remaining node is listed after the removal');

# ---------------------------------------------------------------------------------------
# A rolled-back add never shows. The committed add after it wakes the worker and is applied,
# so by the time it shows the worker has seen every commit before it.

$s->query_safe("BEGIN; SELECT peerpool.pool_add_node('rolled_back', $ci{$p3}); ROLLBACK;");
within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_add_node('$p3', $ci{$p3})",
		"count(*) FILTER (WHERE node_name = '$p3') = 1"),
	'add after a rolled-back add applied');
is_deeply([ PeerpoolFleet::health_names($coord) ],
	[ sort($p2, $p3) ], 'the rolled-back node never shows in node_health');
is($coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.node WHERE node_name = 'rolled_back'"),
	'0', 'the rolled-back node is not in the catalog');

# Put peer1 back so that every peer is registered for the restart and crash tests.
PeerpoolFleet::register($coord, $peers[0]);
ok(PeerpoolFleet::wait_for_health($coord, 'count(*) = 3'), 'three nodes registered');
$s->quit;
my @registered = sort($p1, $p2, $p3);

# ---------------------------------------------------------------------------------------
# Nodes survive a restart: the worker reloads them from the catalog.

my @old_pids = PeerpoolFleet::worker_pids($coord);
is(scalar @old_pids, 1, 'one worker before the restart');
$coord->restart;
my $elapsed = PeerpoolFleet::wait_for_health($coord,
	"count(*) = 3 AND count(*) FILTER (WHERE node_name IN ('$p1', '$p2', '$p3')) = 3");
ok(defined $elapsed, 'node_health lists the registered nodes after a restart');
note sprintf('registry reloaded %.1f ms after pg_ctl restart returned', 1000 * ($elapsed // 0));
is_deeply([ PeerpoolFleet::health_names($coord) ],
	\@registered, 'same node names after the restart');
ok( PeerpoolFleet::wait_until(
		$coord,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = '$worker' AND datname = 'postgres'"
	),
	'one worker after the restart');

# ---------------------------------------------------------------------------------------
# Worker killed with SIGKILL: the postmaster reinitializes shared memory and restarts the
# worker, which rebuilds node_health from the catalog.

my ($victim) = PeerpoolFleet::worker_pids($coord);
ok(defined $victim && $victim =~ /^\d+$/, 'found the worker pid');
my $t0 = time;
is(kill('KILL', $victim), 1, "sent SIGKILL to the worker (pid $victim)");
$elapsed = PeerpoolFleet::wait_until(
	$coord,
	"SELECT count(*) = 1 AND min(pid) <> $victim FROM pg_stat_activity WHERE backend_type = '$worker' AND datname = 'postgres'",
	start => $t0);
ok(defined $elapsed, 'a new worker runs after the crash');
note sprintf('new worker up %.1f ms after SIGKILL', 1000 * ($elapsed // 0));
$elapsed = PeerpoolFleet::wait_for_health($coord,
	"count(*) = 3 AND count(*) FILTER (WHERE node_name IN ('$p1', '$p2', '$p3') AND state IN ($enabled_set)) = 3",
	undef, start => $t0);
ok(defined $elapsed, 'node_health lists every node after the crash');
note sprintf('registry rebuilt %.1f ms after SIGKILL', 1000 * ($elapsed // 0));
is_deeply([ PeerpoolFleet::health_names($coord) ],
	\@registered, 'same node names after the crash');
ok($coord->log_contains(qr/\(PID $victim\) was terminated by signal 9/),
	'the postmaster logged the worker kill');

# The registry still works after the crash.
$s = PeerpoolFleet::session($coord);
within_1s(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_remove_node('$p3')",
		"count(*) FILTER (WHERE node_name = '$p3') = 0"),
	'pool_remove_node applied by the restarted worker');
$s->quit;

# ---------------------------------------------------------------------------------------

PeerpoolFleet::check_logs($coord, @peers, { killed_pids => [$victim] });
$_->stop for ($coord, @peers);

done_testing();
