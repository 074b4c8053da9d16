# Copyright (c) pg_peerpool contributors
#
# Blast radius (SPEC section 7): nothing one caller sends or one node returns may crash the
# server, end the pool manager, or delay other callers. Each block is a reproduction of the
# issue "Blast radius" against 0.1 code: a subtransaction abort during a request (segfault),
# a row too big for the request channel (pool manager exit), pg_cancel_backend() of the pool
# manager (every pool torn down), unbounded notices, timeouts near INT_MAX (overflow), and a
# slow conversion past the deadline (busy loop, late timeout).
use strict;
use warnings FATAL => 'all';

use lib 't';
use PeerpoolFleet;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $coord = PeerpoolFleet::coordinator('coord',
	conf => "peerpool.health_check_interval = '500ms'\nlog_min_messages = log");
my ($peer1, $peer2) = PeerpoolFleet::peers(2);
PeerpoolFleet::register($coord, $peer1, $peer2);
ok(defined PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2"),
	'both peers healthy');
my ($worker) = PeerpoolFleet::worker_pids($coord);

# ---- 1. a subtransaction inside the conversion of a pool_query row ------------------------
$coord->safe_psql('postgres', q{
CREATE FUNCTION f(text) RETURNS bool LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1/0; RETURN true; EXCEPTION WHEN division_by_zero THEN RETURN true; END$$;
CREATE DOMAIN d AS text CHECK (f(VALUE));
CREATE FUNCTION nested(text) RETURNS bool LANGUAGE plpgsql AS
  $$BEGIN PERFORM * FROM peerpool.pool_query('SELECT 1', 'peer2') AS t(x int); RETURN true; END$$;
CREATE DOMAIN d_nested AS text CHECK (nested(VALUE));
});
my ($ret, $out, $err) = $coord->psql('postgres',
	q{SELECT * FROM peerpool.pool_query('SELECT g::text FROM generate_series(1,3) g', 'peer1') AS t(v d)});
is($ret, 0, 'a subtransaction rolled back inside a row conversion does not end the request');
is($out, "1\n2\n3", 'every row arrives');

($ret, $out, $err) = $coord->psql('postgres',
	q{\set VERBOSITY verbose
SELECT * FROM peerpool.pool_query('SELECT g::text FROM generate_series(1,3) g', 'peer1') AS t(v d_nested)});
isnt($ret, 0, 'a pool_query nested in the conversion of another is refused');
like($err, qr/0A000: pg_peerpool calls cannot be nested/, 'with a clear error (0A000)');
# The same nested call, caught: the outer request goes on and returns every row.
$coord->safe_psql('postgres', q{
CREATE FUNCTION nested_caught(text) RETURNS bool LANGUAGE plpgsql AS
  $$BEGIN PERFORM * FROM peerpool.pool_query('SELECT 1', 'peer2') AS t(x int); RETURN true;
    EXCEPTION WHEN feature_not_supported THEN RETURN true; END$$;
CREATE DOMAIN d_caught AS text CHECK (nested_caught(VALUE));
});
is( $coord->safe_psql('postgres',
		q{SELECT string_agg(v, ',') FROM peerpool.pool_query('SELECT g::text FROM generate_series(1,3) g', 'peer1') AS t(v d_caught)}),
	'1,2,3',
	'a refused nested call caught by an exception block leaves the outer request running');
# A pool_query whose own subtransaction aborts is abandoned, and the session can go on.
is( $coord->safe_psql('postgres', q{
DO $$BEGIN
  BEGIN
    PERFORM * FROM peerpool.pool_query('SELECT 1/0', 'peer1') AS t(x int);
  EXCEPTION WHEN division_by_zero THEN NULL;
  END;
END$$;
SELECT count(*) FROM peerpool.pool_query('SELECT 1', 'peer1') AS t(x int);}),
	'1', 'a request whose own subtransaction aborted is abandoned; the next call works');
is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, 'no crash: same pool manager');

# ---- 2. one row too big for the request channel fails its request only --------------------
# The row is built and shipped by the peer (about 35-50 s on this 2-core machine, as for psql
# itself); meanwhile other callers keep using another node through the same pool manager.
my $big = PeerpoolFleet::psql_start($coord,
	[q{SELECT length(x) FROM peerpool.pool_query($$SELECT repeat('x', 1073741816)$$, 'peer1', timeout_ms => 600000) AS t(x text)}],
	application_name => 'big_row', timeout => 300);
ok(defined PeerpoolFleet::wait_until($peer1,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'pg_peerpool' AND query LIKE '%repeat%'"),
	'the big row is being produced on peer1');
my ($neighbour_calls, $neighbour_failures) = (0, 0);
while (PeerpoolFleet::psql_running($big) && $neighbour_calls < 100000)
{
	my ($r, $o, $e) = $coord->psql('postgres',
		q{SELECT x FROM peerpool.pool_query('SELECT 1', 'peer2') AS t(x int)});
	$neighbour_calls++;
	if ($r != 0 || $o ne '1')
	{
		$neighbour_failures++;
		note "a call to peer2 failed (psql exit $r): " . ($e // '') if $neighbour_failures <= 3;
	}
	usleep(100_000);
}
my ($code, $bout, $berr) = PeerpoolFleet::psql_finish($big);
note "calls to peer2 while the 1 GB row travelled: $neighbour_calls, failed: $neighbour_failures";
like($berr, qr/54000: node "peer1" returned a row of \d+ bytes, more than pg_peerpool can pass/,
	'the oversized row fails its call with 54000');
cmp_ok($neighbour_calls, '>', 0, 'other callers were served meanwhile');
is($neighbour_failures, 0, 'no other caller failed');
is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, 'the pool manager did not exit');
is($coord->safe_psql('postgres', q{SELECT x FROM peerpool.pool_query('SELECT 42', 'peer1') AS t(x int)}),
	'42', 'the node serves the next call');
ok(defined PeerpoolFleet::wait_until($peer1,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool' AND query LIKE '%repeat%' AND state = 'active'"),
	'the oversized query does not go on running on the peer');
my ($sout, $serr);
my $slow;

# ---- 3. pg_cancel_backend() of the pool manager ---------------------------------------------
my $closed_before = $coord->safe_psql('postgres', 'SELECT sum(closed) FROM peerpool.pool_stats');
my $offset = -s $coord->logfile;
$slow = PeerpoolFleet::psql_start($coord,
	[q{SELECT x FROM peerpool.pool_query('SELECT pg_sleep(2)::text', 'peer2') AS t(x text)}]);
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT active = 1 FROM peerpool.pool_stats WHERE node_name = 'peer2'"), 'a call runs');
is($coord->safe_psql('postgres', "SELECT pg_cancel_backend($worker)"), 't', 'SIGINT sent');
($code, $sout, $serr) = PeerpoolFleet::psql_finish($slow);
is($code, 0, 'the running call completes after pg_cancel_backend(pool manager)') or diag $serr;
is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, 'the pool manager carries on');
is($coord->safe_psql('postgres', 'SELECT sum(closed) FROM peerpool.pool_stats'), $closed_before,
	'no pooled connection was closed');
ok(defined PeerpoolFleet::wait_until($coord, 'SELECT true', timeout => 1)
	  && PeerpoolFleet::log_since($coord, $offset) =~ /ignoring a cancel request \(SIGINT\)/,
	'the cancel request is logged');

# ---- 4. notices are bounded -----------------------------------------------------------------
my $rss0 = PeerpoolFleet::proc_memory_kb($worker);
$offset = -s $coord->logfile;
my $t0 = time;
$out = $coord->safe_psql('postgres', q{SELECT success FROM peerpool.parallel_query(
  $q$DO $d$BEGIN FOR i IN 1..150 LOOP RAISE NOTICE '%', repeat('n', 2000000); END LOOP; END$d$$q$,
  ARRAY['peer1'])});
is($out, 't', '150 notices of 2 MB: the call succeeds');
note sprintf('notices call took %.1f s', time - $t0);
my $rss1 = PeerpoolFleet::proc_memory_kb($worker);
my $growth = ($rss1->{rss} - $rss0->{rss}) / 1024;
note sprintf('pool manager RSS %.1f MB -> %.1f MB (peak %.1f MB)',
	$rss0->{rss} / 1024, $rss1->{rss} / 1024, $rss1->{hwm} / 1024);
cmp_ok($growth, '<', 10, 'pool manager RSS grows by less than 10 MB');
my $logged = length(PeerpoolFleet::log_since($coord, $offset));
note "log grew by $logged bytes";
cmp_ok($logged, '<', 200_000, 'the server log does not carry the notices in full');
like(PeerpoolFleet::log_since($coord, $offset), qr/further notices not logged/,
	'dropped notices are counted');

# ---- 5. a slow conversion past the deadline: no busy loop, timeout on time ------------------
$coord->safe_psql('postgres', q{
CREATE FUNCTION slow_ok(text) RETURNS bool LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(0.01); RETURN true; END$$;
CREATE DOMAIN d_slow AS text CHECK (slow_ok(VALUE));
});
my $cpu0 = cpu_seconds($worker);
$t0 = time;
($ret, $out, $err) = $coord->psql('postgres', q{\set VERBOSITY verbose
SELECT count(*) FROM peerpool.pool_query('SELECT g::text FROM generate_series(1, 3000) g', 'peer1', timeout_ms => 300) AS t(v d_slow)},
	timeout => 60);
my $elapsed = time - $t0;
my $cpu = cpu_seconds($worker) - $cpu0;
note sprintf('slow conversion: call ended after %.0f ms; pool manager CPU %.3f s', 1000 * $elapsed, $cpu);
like($err, qr/57014/, 'the call times out (57014)');
cmp_ok($elapsed, '<', 1.5, 'the deadline ends the call promptly (300 ms timeout)');
cmp_ok($cpu, '<', 0.3, 'the pool manager does not spin while the caller converts');
is($coord->safe_psql('postgres', q{SELECT x FROM peerpool.pool_query('SELECT 7', 'peer1') AS t(x int)}),
	'7', 'the node serves the next call');

is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, 'one pool manager throughout');

# ---- 6. time GUCs at their extremes ---------------------------------------------------------
# Sums of INT_MAX milliseconds once overflowed into deadlines in the past ("timed out after
# 0 ms"); the largest values must behave as "very long", the smallest as "very short".
$coord->stop;
$coord->append_conf('postgresql.conf', join("\n",
	"peerpool.connect_timeout = 2147483647",
	"peerpool.health_check_timeout = 2147483647",
	"peerpool.query_timeout = 2147483647",
	"peerpool.acquire_timeout = 2147483647",
	"peerpool.idle_timeout = 2147483647",
	"peerpool.max_lifetime = 2147483647",
	"peerpool.reconnect_backoff_initial = 2147483647",
	"peerpool.reconnect_backoff_max = 2147483647",
	"peerpool.degraded_latency = 2147483647",
	"peerpool.unhealthy_latency = 2147483647",
	"peerpool.degraded_lag = 2147483647",
	"peerpool.unhealthy_lag = 2147483647",
	"peerpool.drain_timeout = 2147483647"));
$coord->start;
ok(defined PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 20),
	'every time GUC at INT_MAX: the nodes become healthy');
is($coord->safe_psql('postgres', q{SELECT x FROM peerpool.pool_query('SELECT 8', 'peer1') AS t(x int)}),
	'8', 'and serve calls');
$coord->stop;
$coord->append_conf('postgresql.conf', join("\n",
	"peerpool.health_check_interval = 10",
	"peerpool.connect_timeout = 10",
	"peerpool.health_check_timeout = 10",
	"peerpool.query_timeout = 1",
	"peerpool.acquire_timeout = 1",
	"peerpool.idle_timeout = 1",
	"peerpool.max_lifetime = 1",
	"peerpool.reconnect_backoff_initial = 1",
	"peerpool.reconnect_backoff_max = 1",
	"peerpool.degraded_latency = 0",
	"peerpool.unhealthy_latency = 0",
	"peerpool.drain_timeout = 0"));
$coord->start;
($worker) = PeerpoolFleet::worker_pids($coord);
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT count(*) = 2 FROM peerpool.node_health WHERE last_check IS NOT NULL"),
	'every time GUC at its minimum: checks run');
usleep(1_000_000);
is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, 'and the pool manager stays up');
$coord->stop;

PeerpoolFleet::check_logs($coord, $peer1, $peer2);
done_testing();

# utime + stime of a process in seconds (from /proc; Linux).
sub cpu_seconds
{
	my ($pid) = @_;
	my $stat = slurp_file("/proc/$pid/stat");
	$stat =~ s/^.*\) //s;
	my @f = split / /, $stat;
	return ($f[11] + $f[12]) / 100;    # clock ticks (USER_HZ = 100)
}
