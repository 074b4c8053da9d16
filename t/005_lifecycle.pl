# Copyright (c) pg_peerpool contributors

# Connection lifecycle and resources (SPEC sections 2, 7 and 8): idle connections above
# min_connections close after idle_timeout, connections are recycled at max_lifetime,
# a removed node's connections close, a crashed worker comes back and heals, shutdown
# closes every connection cleanly, peerpool.max_total_connections caps the fleet, and a
# password in a conninfo never shows in events, logs or errors.

use strict;
use warnings FATAL => 'all';

use List::Util qw(sum max);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $idle_timeout_s = 1;
my $interval_s     = 2;
my $secret         = 'supersecret123';
my $user           = getpwuid($<) // $ENV{USER};

# Checks every 2 s, so that a connection used only by checks sits idle longer than
# idle_timeout between them. Statements are not logged (log_statement, and STATEMENT lines
# after errors), so that any password in the log was written by pg_peerpool.
my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<"EOC");
restart_after_crash = on
log_statement = none
log_min_error_statement = panic
peerpool.health_check_interval = '${interval_s}s'
peerpool.health_check_timeout = '1s'
peerpool.idle_timeout = '${idle_timeout_s}s'
peerpool.reconnect_backoff_initial = '100ms'
peerpool.reconnect_backoff_max = '400ms'
peerpool.degraded_latency = '500ms'
EOC
# DEBUG1 on the peers logs "unexpected EOF on client connection" when a client goes away
# without a Terminate message, i.e. without PQfinish.
my @peers = PeerpoolFleet::peers(3, conf => 'log_min_messages = debug1');
my ($p1, $p2, $p3) = map { $_->name } @peers;
my %peer = map { $_->name => $_ } @peers;

sub stat_of
{
	my ($node, $name, $col) = @_;
	return $node->safe_psql('postgres',
		"SELECT $col FROM peerpool.pool_stats WHERE node_name = '$name'");
}

sub wait_healthy
{
	my ($node, $names, %opts) = @_;
	my $list = join(', ', map { "'$_'" } @$names);
	return PeerpoolFleet::wait_for_health($node,
		"count(*) FILTER (WHERE node_name IN ($list) AND state = 'healthy') = " . scalar(@$names),
		$opts{timeout}, %opts);
}

# Wait until the peer shows $n sessions of application_name $app (default pg_peerpool).
sub wait_sessions
{
	my ($peer, $n, %opts) = @_;
	my $app = PeerpoolFleet::quote(delete $opts{application_name} // 'pg_peerpool');
	return PeerpoolFleet::wait_until($peer,
		"SELECT count(*) = $n FROM pg_stat_activity WHERE application_name = $app", %opts);
}

# "unexpected EOF on client connection" lines in a peer's log since $offset, for the pids.
sub eof_lines
{
	my ($peer, $offset, @pids) = @_;
	my %want = map { $_ => 1 } @pids;
	return grep { /\[(\d+)\].*unexpected EOF on client connection/ && $want{$1} }
	  split /\n/, PeerpoolFleet::log_since($peer, $offset);
}

PeerpoolFleet::register($coord, { sql_extra => 'min_connections => 0' }, $peers[0]);
PeerpoolFleet::register($coord, @peers[ 1, 2 ]);
ok(wait_healthy($coord, [ $p1, $p2, $p3 ]), 'three peers healthy');

# ---------------------------------------------------------------------------------------
# idle_timeout: with min_connections = 0 a check opens one connection, which closes after
# idle_timeout.

my $closed0 = stat_of($coord, $p1, 'closed');
my $t0 = time;
$coord->safe_psql('postgres', "SELECT count(*) FROM peerpool.pool_check_health('$p1')");
is(PeerpoolFleet::remote_sessions($peer{$p1}), '1', "$p1: the check left one connection open");
my $elapsed = wait_sessions($peer{$p1}, 0, start => $t0, timeout => 10);
ok(defined $elapsed, "$p1: the idle connection closed");
note sprintf('%s: idle connection closed %.1f ms after the check (idle_timeout %d s)',
	$p1, 1000 * ($elapsed // 0), $idle_timeout_s);
cmp_ok($elapsed // 0, '>=', 0.9 * $idle_timeout_s, "$p1: not closed before idle_timeout");
cmp_ok($elapsed // 9**9**9, '<', $idle_timeout_s + $interval_s + 1.5,
	"$p1: closed within idle_timeout (+ one check interval that may reuse it)");
cmp_ok(stat_of($coord, $p1, 'closed'), '>', $closed0, "$p1: pool_stats.closed increased");
is(stat_of($coord, $p1, 'state'), 'healthy', "$p1 stays healthy with no connection");

# ---------------------------------------------------------------------------------------
# max_lifetime: the pooled session is replaced (a new backend pid on the peer) and counted
# as recycled; never before the lifetime is reached.

PeerpoolFleet::set_gucs($coord, 'peerpool.max_lifetime' => '2s');
ok(wait_sessions($peer{$p2}, 1), "$p2: one pooled session");
# The session may be replaced between the two queries (it is already older than 2 s): read its
# pid again until there is one.
my $pid0;
for (1 .. 150) {
	($pid0) = PeerpoolFleet::remote_pids($peer{$p2});
	last if defined $pid0;
	select(undef, undef, undef, 0.1);
}
ok(defined $pid0, "$p2: the pooled session's pid is known");
$pid0 //= 0;
my $recycled0 = stat_of($coord, $p2, 'recycled');
my $pid_changed = sub {
	my ($old, %opts) = @_;
	return PeerpoolFleet::wait_until($peer{$p2},
		"SELECT count(*) = 1 AND min(pid) <> $old FROM pg_stat_activity WHERE application_name = 'pg_peerpool'",
		timeout => 15, %opts);
};
$elapsed = $pid_changed->($pid0);
ok(defined $elapsed, "$p2: the session was replaced (pid $pid0 gone)");
# The lifetime is measured on the peer: backend_start of one pooled session to backend_start
# of its replacement. The replacement opens only after the old session closed, and the old one
# opened (on the coordinator) just before its backend_start, so this is the old session's
# lifetime less its connect time, however late the polling below sees either change.
my $session_start = sub {
	my ($pid) = @_;
	return $peer{$p2}->safe_psql('postgres',
		"SELECT extract(epoch FROM backend_start) FROM pg_stat_activity WHERE pid = $pid");
};
my ($pid1) = PeerpoolFleet::remote_pids($peer{$p2});
my $start1 = defined $pid1 ? $session_start->($pid1) : '';
note sprintf('%s: first replacement seen %.1f ms after max_lifetime was set; pid %s -> %s',
	$p2, 1000 * ($elapsed // 0), $pid0, $pid1 // '?');
$elapsed = $pid_changed->($pid1 // 0);
ok(defined $elapsed, "$p2: the replacement was replaced in turn");
my ($pid2) = PeerpoolFleet::remote_pids($peer{$p2});
my $start2 = defined $pid2 ? $session_start->($pid2) : '';
my $lifetime = ($start1 ne '' && $start2 ne '') ? $start2 - $start1 : undef;
note sprintf('%s: pid %s lived %.1f ms by backend_start on the peer (max_lifetime 2 s, checks every %d s)',
	$p2, $pid1 // '?', 1000 * ($lifetime // 0), $interval_s);
ok(defined $lifetime, "$p2: both sessions' backend_start read");
cmp_ok($lifetime // 0, '>=', 1.9, "$p2: a connection lives at least max_lifetime (less its connect time)");
cmp_ok($lifetime // 9**9**9, '<', 2 + $interval_s + 1.5, "$p2: recycled soon after max_lifetime");
cmp_ok(stat_of($coord, $p2, 'recycled'), '>=', $recycled0 + 2, "$p2: pool_stats.recycled counts both");
PeerpoolFleet::set_gucs($coord, 'peerpool.max_lifetime' => undef);
is(stat_of($coord, $p2, 'state'), 'healthy', "$p2 stays healthy through recycling");

# ---------------------------------------------------------------------------------------
# A password in a conninfo never shows: not in events, node_health, error messages or the
# log, through connection failures, a conninfo change, an outage and a removal.

my $dead_port = PostgreSQL::Test::Cluster::get_free_port();
my $dead = "host=127.0.0.1 port=$dead_port dbname=postgres user=$user password=$secret";
my $live = sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s password=%s application_name=pp_secret',
	$peer{$p3}->port, $user, $secret);
my $t_secret = time;
$coord->safe_psql('postgres',
	'SELECT peerpool.pool_add_node(\'secret\', ' . PeerpoolFleet::quote($dead) . ')');
ok( PeerpoolFleet::wait_until(
		$coord,
		"SELECT count(*) >= 2 FROM peerpool.events WHERE node_name = 'secret' AND to_state = 'reconnecting'",
		timeout => 10),
	'secret: a node with a password that cannot connect retries');
note 'secret: last_error: '
  . $coord->safe_psql('postgres', "SELECT last_error FROM peerpool.node_health WHERE node_name = 'secret'");

$coord->safe_psql('postgres',
	"SELECT peerpool.pool_alter_node('secret', conninfo => " . PeerpoolFleet::quote($live) . ')');
ok(wait_healthy($coord, ['secret'], timeout => 10), 'secret: healthy after its conninfo changed');
ok(wait_sessions($peer{$p3}, 1, application_name => 'pp_secret'),
	'secret: the conninfo application_name is used instead of peerpool.application_name');

my @calls = (
	[ "SELECT peerpool.pool_alter_node('secret', conninfo => 'host=127.0.0.1 password=$secret nosuchoption=1')",
		'22023', 'alter with an invalid conninfo' ],
	[ 'SELECT peerpool.pool_add_node(\'secret\', ' . PeerpoolFleet::quote($live) . ')',
		'42710', 'add a duplicate' ],
	[ "SELECT peerpool.pool_add_node('secret2', 'postgresql://$user:$secret\@127.0.0.1:1/postgres?nosuchoption=1')",
		'22023', 'add an invalid URI' ],
	[ "SELECT peerpool.pool_add_node('bad name!', 'host=127.0.0.1 password=$secret')",
		'22023', 'add with a bad name' ],
	[ "SELECT peerpool.pool_alter_node('secret', min_connections => 5, max_connections => 2)",
		'22023', 'alter with min > max' ]);
for my $c (@calls)
{
	my ($sql, $code, $what) = @$c;
	my ($ret, $err) = PeerpoolFleet::psql_error($coord, "$sql;");
	isnt($ret, 0, "$what fails");
	like($err, qr/ERROR:\s+$code:/, "$what: SQLSTATE $code");
	unlike($err, qr/\Q$secret\E/, "$what: the error does not show the password");
	note "$what:\n$err";
}

# An outage of the live node: unhealthy, reconnecting with libpq errors, healthy again.
my $t_out = time;
$peer{$p3}->stop('immediate');
ok( PeerpoolFleet::wait_until(
		$coord,
		"SELECT count(*) >= 2 FROM peerpool.events WHERE node_name = 'secret' AND to_state = 'reconnecting'"
		  . sprintf(' AND at > to_timestamp(%.6f)', $t_out),
		timeout => 10),
	'secret: reconnecting while its peer is down');
$peer{$p3}->start;
ok(wait_healthy($coord, [ 'secret', $p3 ], timeout => 15), "secret and $p3 healthy after the outage");

is( $coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.nodes WHERE node_name = 'secret' AND conninfo LIKE '%$secret%'"),
	'0', 'peerpool.nodes masks the password');
is( $coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.node_health WHERE coalesce(last_error, '') LIKE '%$secret%'"),
	'0', 'node_health.last_error does not show the password');

$t0 = time;
$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('secret')");
$elapsed = wait_sessions($peer{$p3}, 0, application_name => 'pp_secret', start => $t0, timeout => 10);
PeerpoolFleet::timed_ok($elapsed, 2, 'secret: its session closed after pool_remove_node');

my @secret_events = PeerpoolFleet::events($coord, 'secret');
note "secret events:\n" . join("\n", map { "  $_->{from}->$_->{to}: $_->{reason}" } @secret_events);
cmp_ok(scalar @secret_events, '>=', 6, 'secret went through several transitions');
is( $coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.events WHERE reason LIKE '%$secret%' OR node_name LIKE '%$secret%'"),
	'0', 'peerpool.events does not show the password');
my @leaks = grep { /\Q$secret\E/ } split /\n/, slurp_file($coord->logfile);
is(join("\n", @leaks), '', 'the coordinator log does not show the password');

# ---------------------------------------------------------------------------------------
# pool_remove_node: draining, then no session left on the peer and no node_health row.

ok(wait_sessions($peer{$p2}, 1), "$p2: one pooled session before the removal");
$t0 = time;
$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('$p2')");
$elapsed = wait_sessions($peer{$p2}, 0, start => $t0, timeout => 15);
PeerpoolFleet::timed_ok($elapsed, 2, "$p2: no session left after pool_remove_node");
ok( PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE node_name = '$p2') = 0", 5),
	"$p2: gone from node_health");
my @removed = PeerpoolFleet::events($coord, $p2, since => $t0);
is(join(',', PeerpoolFleet::transitions(@removed)), 'healthy->draining', "$p2: event healthy -> draining");

# ---------------------------------------------------------------------------------------
# The worker killed with SIGKILL: the postmaster restarts it, it rebuilds the pools, the
# nodes are healthy again, and the old sessions are gone (no leak).

ok(wait_sessions($peer{$p3}, 1), "$p3: one pooled session before the crash");
my %off = map { $_ => -s $peer{$_}->logfile } ($p1, $p3);
my @old_p3 = PeerpoolFleet::remote_pids($peer{$p3});
my ($victim) = PeerpoolFleet::worker_pids($coord);
my $t_kill = time;
is(kill('KILL', $victim), 1, "sent SIGKILL to the worker (pid $victim)");
$elapsed = PeerpoolFleet::wait_until(
	$coord,
	"SELECT count(*) = 1 AND min(pid) <> $victim FROM pg_stat_activity WHERE backend_type = '$PeerpoolFleet::WORKER_TYPE'",
	start => $t_kill);
ok(defined $elapsed, 'a new worker runs after the crash');
note sprintf('new worker %.1f ms after SIGKILL', 1000 * ($elapsed // 0));
$elapsed = wait_healthy($coord, [ $p1, $p3 ], start => $t_kill, timeout => 30);
ok(defined $elapsed, 'nodes healthy again after the worker crash');
note sprintf('nodes healthy %.1f ms after SIGKILL', 1000 * ($elapsed // 0));
is(join(',', PeerpoolFleet::health_names($coord)), "$p1,$p3", 'the same nodes after the crash');
ok( PeerpoolFleet::wait_until(
		$peer{$p3},
		"SELECT count(*) = 1 AND bool_and(pid NOT IN (" . join(',', @old_p3, 0) . "))"
		  . " FROM pg_stat_activity WHERE application_name = 'pg_peerpool'"),
	"$p3: exactly one new pooled session after the crash (the old one is gone)");
# Positive control for the clean-shutdown check below: a killed client is seen as EOF.
ok(eof_lines($peer{$p3}, $off{$p3}, @old_p3) > 0,
	"$p3 logged 'unexpected EOF' for the killed worker's session (the check below can see it)");

# ---------------------------------------------------------------------------------------
# Coordinator shutdown (fast): the worker closes every connection cleanly (Terminate, not
# just a dropped socket), and no session is left on any peer.

$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('$p1', min_connections => 2)");
ok(wait_sessions($peer{$p1}, 2), "$p1: two pooled sessions after min_connections => 2");
ok(wait_sessions($peer{$p3}, 1), "$p3: one pooled session");
my %pids = map { $_ => [ PeerpoolFleet::remote_pids($peer{$_}) ] } ($p1, $p3);
%off = map { $_ => -s $peer{$_}->logfile } ($p1, $p3);
my $t_stop = time;
$coord->stop('fast');
my $stopped = time;
note sprintf('coordinator fast shutdown took %.1f ms', 1000 * ($stopped - $t_stop));
for my $name ($p1, $p3)
{
	# Measured from the end of pg_ctl stop, so the second peer's time includes the first peer's
	# poll (a psql start each, slow on a loaded machine): the bound allows for that.
	PeerpoolFleet::timed_ok(wait_sessions($peer{$name}, 0, start => $stopped, timeout => 10),
		3, "$name: no pooled session left after the coordinator stopped");
	is(join("\n", eof_lines($peer{$name}, $off{$name}, @{ $pids{$name} })), '',
		"$name: every pooled session was closed with a Terminate message");
}
is(PeerpoolFleet::remote_sessions($peer{$p2}), '0', "$p2: no pooled session either");

# ---------------------------------------------------------------------------------------
# peerpool.max_total_connections = 3 with 3 nodes wanting 2 connections each: the fleet
# never holds more than 3 connections, sampled on the peers (pg_stat_activity), in the
# kernel (TCP sockets to the peers' ports) and in pool_stats, from registration on.

my $cap = 3;
my $coord2 = PeerpoolFleet::coordinator(
	'coord2', conf => <<"EOC");
peerpool.max_total_connections = $cap
peerpool.health_check_interval = '300ms'
peerpool.health_check_timeout = '1s'
peerpool.degraded_latency = '500ms'
EOC
my @ports = map { $_->port } @peers;
my %max = (tcp => 0, sessions => 0, stats => 0);
my @over;
my ($samples, $tcp_samples) = (0, 0);
my $sample_tcp = sub {
	my $n = PeerpoolFleet::tcp_clients_to(@ports);
	$tcp_samples++;
	$max{tcp} = max($max{tcp}, $n);
	push @over, sprintf('%.3f s: %d TCP connections', time - $t0, $n) if $n > $cap;
};
# All three nodes in one transaction, so that the worker fills their pools at once.
$coord2->safe_psql('postgres',
	'SELECT ' . join(', ',
		map { sprintf('peerpool.pool_add_node(%s, %s, min_connections => 2)',
			PeerpoolFleet::quote($_->name), PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($_))) } @peers));
$t0 = time;
# While the pools fill: the kernel's view only, every few milliseconds.
while (time - $t0 < 1)
{
	$sample_tcp->();
	usleep(2_000);
}
# Then all three views, the TCP count between each query.
my $created_mid;
while (time - $t0 < 4)
{
	$sample_tcp->();
	my @per_peer;
	for my $p (@peers)
	{
		push @per_peer, PeerpoolFleet::remote_sessions($p);
		$sample_tcp->();
	}
	my $sessions = sum(@per_peer);
	$max{sessions} = max($max{sessions}, $sessions);
	push @over, sprintf('%.3f s: sessions %s', time - $t0, join('+', @per_peer)) if $sessions > $cap;
	my ($stats, $created) = split /\|/, $coord2->safe_psql('postgres',
		'SELECT coalesce(sum(total), 0), coalesce(sum(created), 0) FROM peerpool.pool_stats');
	$max{stats} = max($max{stats}, $stats);
	push @over, sprintf('%.3f s: pool_stats total %d', time - $t0, $stats) if $stats > $cap;
	$created_mid //= $created if time - $t0 >= 2;
	$samples++;
	usleep(20_000);
}
my $created_end = $coord2->safe_psql('postgres', 'SELECT sum(created) FROM peerpool.pool_stats');
note sprintf('%d TCP samples and %d full samples over 4 s; max TCP %d, max sessions %d, max pool_stats total %d; '
	  . 'connections created in the last 2 s: %d', $tcp_samples, $samples, $max{tcp}, $max{sessions}, $max{stats},
	$created_end - ($created_mid // $created_end));
is(join("\n", @over), '', "the fleet never held more than $cap connections");
is($max{sessions}, $cap, "the pools did fill the budget of $cap");
is($max{tcp}, $cap, "the kernel view saw the $cap connections too (the TCP count works)");
ok(wait_healthy($coord2, [ $p1, $p2, $p3 ], timeout => 10), 'every node is healthy within the budget');
note 'sessions per peer: ' . join(', ', map { $_->name . '=' . PeerpoolFleet::remote_sessions($_) } @peers);

# ---------------------------------------------------------------------------------------

PeerpoolFleet::check_logs($coord, $coord2, @peers, { killed_pids => [$victim] });
$_->stop for ($coord2, @peers);

done_testing();
