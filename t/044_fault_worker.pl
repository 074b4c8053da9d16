# Copyright (c) pg_peerpool contributors

# The pool manager itself fails while 20 clients are mid-call (issue 11 item 2): SIGTERM
# (a graceful stop: in-flight calls finish within drain_timeout, or fail with a clear
# error) and SIGKILL (the postmaster restarts every backend). No client hangs, exactly one
# pool manager is back, the pools are rebuilt, no remote session is leaked, and calls
# succeed again.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $clients = 20;
my $sleep = 4;
my $drain = 6;

# Cluster.pm sets restart_after_crash = off; a real server restarts after a crash.
my $coord = PeerpoolFleet::coordinator('coord', conf => <<"EOC");
restart_after_crash = on
max_connections = 40
peerpool.health_check_interval = '500ms'
peerpool.drain_timeout = '${drain}s'
peerpool.reconnect_backoff_initial = '100ms'
peerpool.reconnect_backoff_max = '500ms'
EOC
my @peers = PeerpoolFleet::peers(2, conf => "client_connection_check_interval = '100ms'\nmax_connections = 40");
my @names = map { $_->name } @peers;
PeerpoolFleet::register($coord, { sql_extra => 'min_connections => 2, max_connections => 10' }, @peers);

sub all_healthy
{
	return PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", $_[0] // 30);
}
PeerpoolFleet::timed_ok(all_healthy(), 10, 'both peers healthy');

sub remote_active
{
	my $n = 0;
	for my $p (@peers)
	{
		$n += $p->safe_psql('postgres',
			q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_peerpool' AND query LIKE '%fp_mid%' AND state = 'active'});
	}
	return $n;
}

# Start the clients: half pool_query to each peer, every other one a parallel_query over both.
sub start_clients
{
	my @h;
	for my $i (1 .. $clients)
	{
		my $node = $names[ $i % 2 ];
		my $sql =
		  $i % 4 == 0
		  ? qq{SELECT count(*) FILTER (WHERE success) || '/' || count(*) FROM peerpool.parallel_query('SELECT pg_sleep($sleep) /* fp_mid $i */', ARRAY['$node'])}
		  : qq{SELECT 'ok' FROM peerpool.pool_query('SELECT pg_sleep($sleep) /* fp_mid $i */', '$node') AS t(s text)};
		# Every client waits at a barrier (a shared advisory lock the test holds exclusively),
		# so that all of them start their call at once.
		push @h, PeerpoolFleet::psql_start($coord, [ 'SELECT pg_advisory_lock_shared(4242)', $sql ],
			application_name => "fp_client_$i", timeout => 60);
	}
	return @h;
}

# Wait for every client; returns (finished within $limit s of $t0, outcomes by kind).
sub finish_clients
{
	my ($t0, @h) = @_;
	my (%kinds, $worst);
	$worst = 0;
	for my $h (@h)
	{
		my ($ret, $out, $err) = PeerpoolFleet::psql_finish($h);
		($out) = grep { $_ ne '' } reverse split /\n/, $out;    # the call's own output line
		$out //= '';
		my $took = $h->{finished} - $t0;
		$worst = $took if $took > $worst;
		my $kind;
		if ($ret == 0 && ($out eq 'ok' || $out =~ m{^1/1$}))
		{
			$kind = 'succeeded';
		}
		elsif ($ret == 0 && $out =~ m{^0/1$})
		{
			$kind = 'node row failed';
		}
		else
		{
			($kind) = $err =~ /(?:ERROR|FATAL|WARNING):\s+(\S+:[^\n]{0,90})/;
			$kind //= "exit $ret: " . substr($err, 0, 120);
		}
		$kinds{$kind}++;
	}
	return ($worst, \%kinds);
}

sub describe_kinds
{
	my ($k) = @_;
	return join('; ', map { "$k->{$_} x $_" } sort keys %$k);
}

for my $signal ('TERM', 'KILL')
{
	ok(all_healthy(), "SIG$signal: both healthy first");
	my ($old) = PeerpoolFleet::worker_pids($coord);
	my $barrier = $coord->background_psql('postgres');
	$barrier->query_safe('SELECT pg_advisory_lock(4242)');
	my @h = start_clients();
	ok( PeerpoolFleet::wait_until($coord,
			"SELECT count(*) = $clients FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted",
			timeout => 30),
		"SIG$signal: $clients clients at the barrier");
	$barrier->query_safe('SELECT pg_advisory_unlock(4242)');
	$barrier->quit;
	my $deadline = time + 20;
	usleep(50_000) while remote_active() < $clients && time < $deadline;
	my $active = remote_active();
	is($active, $clients, "SIG$signal: $clients remote queries running");
	my $t0 = time;
	is(kill($signal, $old), 1, "SIG$signal sent to the pool manager (pid $old)");

	my ($worst, $kinds) = finish_clients($t0, @h);
	note sprintf('SIG%s with %d clients mid-call: the last client returned %.1f ms after the signal: %s',
		$signal, $clients, 1000 * $worst, describe_kinds($kinds));
	my $bound = $signal eq 'TERM' ? $sleep + $drain + 2 : 5;
	cmp_ok($worst, '<', $bound, "SIG$signal: no client hangs (all back within $bound s)");
	my $unclear = join('; ', map { "$kinds->{$_} x $_" }
		  grep { !/^(succeeded|node row failed)$/ && !/\b(57P01|57P02|57P03|08006|08003|08000|XX000)\b.*\S/ } keys %$kinds);
	is($unclear, '', "SIG$signal: every client succeeded or got a clear error with a SQLSTATE");
	if ($signal eq 'TERM')
	{
		# In-flight calls end within the drain (they need at most 4 s of the 6 s allowed).
		is($kinds->{succeeded} // 0, $clients, 'SIGTERM: every in-flight call finished during the drain');
	}

	my $back = PeerpoolFleet::wait_until($coord,
		"SELECT count(*) = 1 AND min(pid) <> $old FROM pg_stat_activity WHERE backend_type = '$PeerpoolFleet::WORKER_TYPE'",
		timeout => 30, start => $t0);
	PeerpoolFleet::timed_ok($back, 15, "SIG$signal: exactly one new pool manager");
	PeerpoolFleet::timed_ok(all_healthy(), 15, "SIG$signal: both peers healthy again");
	my @now = PeerpoolFleet::worker_pids($coord);
	is(scalar @now, 1, "SIG$signal: still exactly one pool manager (@now)");
	my $ok = PeerpoolFleet::wait_until($coord,
		"SELECT bool_and(success) AND count(*) = 2 FROM peerpool.parallel_query('SELECT 1', ARRAY['$names[0]', '$names[1]'])",
		timeout => 15, start => $t0);
	PeerpoolFleet::timed_ok($ok, 15, "SIG$signal: calls succeed again");
	for my $p (@peers)
	{
		my $clean = PeerpoolFleet::wait_until($p,
			q{SELECT count(*) <= 10 AND count(*) FILTER (WHERE query LIKE '%fp_mid%' AND state <> 'idle') = 0
			  FROM pg_stat_activity WHERE application_name = 'pg_peerpool'},
			timeout => 15);
		ok(defined $clean, sprintf('SIG%s: %s: no leaked remote query, sessions within max (%d now)',
			$signal, $p->name, PeerpoolFleet::remote_sessions($p)));
	}
	push @main::killed, $old if $signal eq 'KILL';
}

PeerpoolFleet::check_logs($coord, { killed_pids => [@main::killed] });
PeerpoolFleet::check_logs(@peers);
$_->stop for ($coord, @peers);

done_testing();
