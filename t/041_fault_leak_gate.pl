# Copyright (c) pg_peerpool contributors

# Leak gate (issue 11 item 2): many injected network failures against one node (px,
# through t/FaultProxy.pm) in mixed modes -- RST and FIN at Query, DataRow,
# CommandComplete and ReadyForQuery, inside open remote transactions, at
# AuthenticationOk of new connections, garbage type bytes, whole-proxy resets and
# refusals -- while a second node (direct) serves. Afterwards the pool manager is the
# same process, its descriptor count is back to its steady value (sockets of the pool
# aside), its RSS grew by less than 10 MB, the peer holds no more sessions of ours than
# max_connections and none idle in transaction, and both nodes answer.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use FaultProxy;
use PeerpoolFleet;

my $target_failures = $ENV{PEERPOOL_LEAK_FAILURES} // 600;
my $t_start = time;
my $user = getpwuid($<) // $ENV{USER};
my ($peer1, $peer2) = PeerpoolFleet::peers(2, conf => "client_connection_check_interval = '100ms'");
$_->safe_psql('postgres', 'CREATE TABLE fp_t (v int)') for ($peer1, $peer2);
my $proxy = FaultProxy->new(upstream_port => $peer1->port, name => 'leak');
END { $proxy->stop if $proxy; }

my $max_conn = 3;
my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
peerpool.health_check_timeout = '500ms'
peerpool.unhealthy_threshold = 2
peerpool.connect_timeout = '2s'
peerpool.reconnect_backoff_initial = '50ms'
peerpool.reconnect_backoff_max = '200ms'
peerpool.acquire_timeout = '2s'
EOC
$proxy->register_pair($coord, $user, $peer2, $max_conn);

sub both_healthy
{
	return PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE state = 'healthy') = 2", $_[0] // 20);
}
PeerpoolFleet::timed_ok(both_healthy(), 10, 'px and direct healthy');

my ($worker) = PeerpoolFleet::worker_pids($coord);
ok($worker, "pool manager pid $worker");

# Descriptors of the pool manager, and how many of them are TCP sockets to its peers.
sub fd_count
{
	opendir(my $dh, "/proc/$worker/fd") or return -1;
	my $n = grep { /^\d+$/ } readdir $dh;
	closedir $dh;
	return $n;
}

sub pool_totals
{
	return $coord->safe_psql('postgres', 'SELECT sum(total) FROM peerpool.pool_stats');
}

# One session for all the calls (a psql per call would dominate the run time).
my $bs = $coord->background_psql('postgres');
$bs->set_query_timer_restart;

# A batch of $n parallel_query calls over px and direct in one statement; returns
# (px successes, direct successes).
sub batch
{
	my ($sql, $n, $timeout_ms) = @_;
	my $out = $bs->query_safe(sprintf(q{
SELECT count(*) FILTER (WHERE node_name = 'px' AND success) || '|'
    || count(*) FILTER (WHERE node_name = 'direct' AND success)
  FROM generate_series(1, %d) i,
       LATERAL peerpool.parallel_query(replace(%s, '#', i::text), ARRAY['px', 'direct'], timeout_ms => %d)},
		$n, PeerpoolFleet::quote($sql), $timeout_ms // 5000));
	return split /\|/, $out;
}

# Warm up and take the steady values.
batch(q{SELECT g, 'warm #' FROM generate_series(1, 100) g}, 50);
ok(both_healthy(), 'healthy after warm-up');
ok( PeerpoolFleet::wait_until($coord,
		'SELECT bool_and(active = 0) FROM peerpool.pool_stats', timeout => 10),
	'nothing active after warm-up');
usleep(300_000);
my $fd0 = fd_count();
my $tot0 = pool_totals();
my $mem0 = PeerpoolFleet::proc_memory_kb($worker);
note sprintf('steady: pool manager %d: %d fds (%d pooled connections), RSS %d kB, peak %d kB',
	$worker, $fd0, $tot0, $mem0->{rss}, $mem0->{hwm});

# The modes: a rule (times => 0: fires at every n-th matching message) and a batch.
my $rows = q{SELECT g, 'fp_leak #' AS m FROM generate_series(1, 100) g};
my $one  = q{SELECT 'fp_leak #' AS m};
my $tx   = q{BEGIN; INSERT INTO fp_t VALUES (#); SELECT 'fp_leak #' AS m};
my @modes = (
	[ 'RST at Q',          { dir => 'fb', type => 'Q', n => 1, how => 'rst' }, $one,  20 ],
	[ 'FIN at Q',          { dir => 'fb', type => 'Q', n => 1, how => 'fin' }, $one,  20 ],
	[ 'RST at D (row 50)', { dir => 'bf', type => 'D', n => 50, how => 'rst' }, $rows, 20 ],
	[ 'FIN at D (row 50)', { dir => 'bf', type => 'D', n => 50, how => 'fin' }, $rows, 20 ],
	[ 'RST at C',          { dir => 'bf', type => 'C', n => 1, how => 'rst' }, $one,  20 ],
	[ 'FIN at Z',          { dir => 'bf', type => 'Z', n => 1, how => 'fin' }, $one,  20 ],
	[ 'RST at D in a transaction', { dir => 'bf', type => 'D', n => 1, how => 'rst' }, $tx, 20 ],
	[ 'FIN at Z in a transaction', { dir => 'bf', type => 'Z', n => 1, how => 'fin' }, $tx, 20 ],
	[ 'garbage instead of D', { dir => 'bf', type => 'D', n => 1, garble => 1 }, $one, 20 ],
);

my %fired;
my $t_loop = time;
my $round = 0;
my $failures = 0;
while ($failures < $target_failures && time - $t_loop < 90)
{
	$round++;
	for my $m (@modes)
	{
		my ($name, $rule, $sql, $n) = @$m;
		my %r = %$rule;
		my $garble = delete $r{garble};
		my $before = $proxy->stats->{fired};
		if ($garble)
		{
			$proxy->garble_at(%r, times => 0, match => qr/fp_leak/);
		}
		else
		{
			$proxy->kill_at(%r, times => 0, match => qr/fp_leak/);
		}
		my ($px_ok, $direct_ok) = batch($sql, $n);
		$proxy->clear_rules;
		my $f = $proxy->stats->{fired} - $before;
		$fired{$name} += $f;
		$failures += $f;
		is($direct_ok, $n, "round $round, $name: direct answered every call")
		  if $round == 1 || $direct_ok != $n;
	}

	# New connections killed at AuthenticationOk, while calls run.
	{
		my $before = $proxy->stats->{fired};
		$proxy->close_all;
		$proxy->kill_at(dir => 'bf', type => 'R', how => ($round % 2 ? 'rst' : 'fin'), times => 0);
		my ($px_ok, $direct_ok) = batch($one, 10, 300);
		usleep(300_000);    # a few reconnect attempts
		$proxy->clear_rules;
		my $f = $proxy->stats->{fired} - $before + 1;    # + the close_all
		$fired{'R (new connections) and close_all'} += $f;
		$failures += $f;
		is($direct_ok, 10, "round $round, R: direct answered every call") if $round == 1 || $direct_ok != 10;
	}

	# Whole-proxy resets and refusals, and a garbled ReadyForQuery (held to the deadline).
	{
		my $before = $proxy->stats;
		$proxy->reset_all;
		batch($one, 2, 300);
		ok(both_healthy(30), "round $round: healthy after reset_all") if $round == 1;
		$proxy->refuse;
		batch($one, 2, 300);
		usleep(200_000);
		$proxy->pass;
		ok(both_healthy(30), "round $round: healthy after refuse");
		$proxy->garble_at(dir => 'bf', type => 'Z', n => 1, times => 2, match => qr/fp_leak/);
		batch($one, 2, 200);
		$proxy->clear_rules;
		my $after = $proxy->stats;
		my $f = $after->{actions} - $before->{actions};
		$fired{'reset_all, refuse, garbage instead of Z'} += $f;
		$failures += $f;
	}
	ok(both_healthy(30), "round $round: both healthy again");
	note sprintf('round %d: %d failures injected so far (%.1f s)', $round, $failures, time - $t_loop);
}
note sprintf('%d failures injected in %d rounds in %.1f s', $failures, $round, time - $t_loop);
note "  $_: $fired{$_}" for sort keys %fired;
cmp_ok($failures, '>=', 300, 'at least 300 failures injected');

# ---------------------------------------------------------------------------------------
# The gate.

ok(both_healthy(30), 'both nodes healthy after the storm');
my @after = PeerpoolFleet::worker_pids($coord);
is("@after", $worker, 'the same pool manager process throughout');

my $idle_in_tx = q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_peerpool'
  AND state LIKE 'idle in transaction%'};
ok(defined PeerpoolFleet::wait_until($peer1, "SELECT ($idle_in_tx) = 0", timeout => 10),
	'peer of px: no session of ours idle in transaction');
ok(defined PeerpoolFleet::wait_until($peer2, "SELECT ($idle_in_tx) = 0", timeout => 10),
	'direct: no session of ours idle in transaction');
my $settled = PeerpoolFleet::wait_until($peer1,
	"SELECT count(*) <= $max_conn FROM pg_stat_activity WHERE application_name = 'pg_peerpool'", timeout => 10);
ok(defined $settled, 'peer of px: sessions of ours <= max_connections');
diag 'peer of px: sessions of ours: ' . $peer1->safe_psql('postgres',
	q{SELECT string_agg(format('pid %s port %s state %s wait %s/%s started %s query %s', pid, client_port, state,
	  wait_event_type, wait_event, backend_start, left(query, 60)), E'\n') FROM pg_stat_activity WHERE application_name = 'pg_peerpool'})
  unless $settled;
note 'peer of px: sessions of ours: ' . PeerpoolFleet::remote_sessions($peer1)
  . '; direct: ' . PeerpoolFleet::remote_sessions($peer2);
cmp_ok(PeerpoolFleet::remote_sessions($peer2), '<=', $max_conn, 'direct: sessions of ours <= max_connections');
ok( PeerpoolFleet::wait_until($coord,
		"SELECT bool_and(total <= $max_conn AND active = 0 AND waiting = 0 AND total = active + idle) FROM peerpool.pool_stats",
		timeout => 10),
	'pool_stats: within max_connections, nothing active or waiting');
note 'pool_stats: ' . $coord->safe_psql('postgres',
	q{SELECT string_agg(format('%s total %s idle %s created %s closed %s errors %s', node_name, total, idle, created, closed, errors), '; ') FROM peerpool.pool_stats});

# Descriptors: the non-pool ones back to the steady count (a closed socket may take a
# moment to go).
my ($fd1, $tot1);
my $fd_ok = PeerpoolFleet::wait_until($coord, 'SELECT true', timeout => 1);    # one round trip
my $deadline = time + 10;
while (1)
{
	$tot1 = pool_totals();
	$fd1 = fd_count();
	last if $fd1 - $tot1 <= $fd0 - $tot0 || time > $deadline;
	usleep(100_000);
}
note sprintf('after: %d fds (%d pooled connections) vs %d (%d) steady', $fd1, $tot1, $fd0, $tot0);
is($fd1 - $tot1, $fd0 - $tot0, 'pool manager: descriptors other than pooled connections back to the steady count');

my $mem1 = PeerpoolFleet::proc_memory_kb($worker);
note sprintf('RSS %d kB -> %d kB (%+d kB), peak %d kB -> %d kB', $mem0->{rss}, $mem1->{rss},
	$mem1->{rss} - $mem0->{rss}, $mem0->{hwm}, $mem1->{hwm});
cmp_ok($mem1->{rss} - $mem0->{rss}, '<', 10 * 1024, 'pool manager RSS grew by less than 10 MB');

my ($px_ok, $direct_ok) = batch(q{SELECT 'after #'}, 20);
is("$px_ok|$direct_ok", '20|20', 'both nodes answer every call afterwards');
is($peer1->safe_psql('postgres', 'SELECT count(*) FROM fp_t'), '0', 'px: no killed remote transaction committed');
is($peer2->safe_psql('postgres', 'SELECT count(*) FROM fp_t'), '0', 'direct: no open transaction was committed');
my $st = $proxy->stats;
note 'proxy: ' . join(' ', map { "$_=$st->{$_}" } grep { !/^msgs_/ } sort keys %$st);
note sprintf('whole test: %.1f s', time - $t_start);

$bs->quit;
$proxy->stop;
PeerpoolFleet::check_logs($coord, $peer1, $peer2);
$_->stop for ($coord, $peer1, $peer2);

done_testing();
