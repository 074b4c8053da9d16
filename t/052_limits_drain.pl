# Copyright (c) pg_peerpool contributors
#
# Local limits are not node failures (SPEC section 3), checks never starve, a node registered
# while another drains starts once the slot frees, a shutdown drain takes no new work and ends
# with the calls it had (SPEC section 7), and a node that is down rests in `unhealthy`.
use strict;
use warnings FATAL => 'all';

use lib 't';
use PeerpoolFleet;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my ($peer1, $peer2) = PeerpoolFleet::peers(2,
	conf => "max_connections = 8\nsuperuser_reserved_connections = 0");

# ---- 1. the fleet budget spent by running queries --------------------------------------------
my $coord = PeerpoolFleet::coordinator('budget',
	conf => "peerpool.max_total_connections = 2\n"
	  . "peerpool.health_check_interval = '300ms'\npeerpool.unhealthy_threshold = 3");
PeerpoolFleet::register($coord, { sql_extra => 'max_connections => 5' }, $peer1);
ok(defined PeerpoolFleet::wait_for_health($coord, "bool_and(state = 'healthy')"), 'healthy');
my $since = time;
my @calls = map {
	PeerpoolFleet::psql_start($coord,
		[q{SELECT x FROM peerpool.pool_query('SELECT pg_sleep(3)::text', 'peer1') AS t(x text)}])
} 1 .. 2;
for my $h (@calls)
{
	my ($code, $out, $err) = PeerpoolFleet::psql_finish($h);
	is($code, 0, 'a call survives while the budget is spent by it and its neighbour') or diag $err;
}
is(scalar(PeerpoolFleet::events($coord, 'peer1', since => $since)), 0,
	'max_total_connections spent: the node never left healthy');
$coord->stop;

# ---- 2. "too many clients" from the peer for a growth connection ------------------------------
$coord = PeerpoolFleet::coordinator('growth',
	conf => "peerpool.health_check_interval = '300ms'\npeerpool.acquire_timeout = '20s'");
PeerpoolFleet::register($coord, { sql_extra => 'max_connections => 10' }, $peer1);
ok(defined PeerpoolFleet::wait_for_health($coord, "bool_and(state = 'healthy')"), 'healthy');
# peer1 takes 8 sessions: 1 warm + growth up to 8, then refuses; 10 callers want one each.
$since = time;
@calls = map {
	PeerpoolFleet::psql_start($coord,
		[q{SELECT x FROM peerpool.pool_query('SELECT pg_sleep(2)::text', 'peer1') AS t(x text)}])
} 1 .. 10;
my $failed = 0;
for my $h (@calls)
{
	my ($code, $out, $err) = PeerpoolFleet::psql_finish($h);
	$failed++ if $code != 0;
	diag $err if $code != 0;
}
is($failed, 0, 'every caller is served although the peer refused growth connections');
is(join(',', map { "$_->{from}->$_->{to}" } PeerpoolFleet::events($coord, 'peer1', since => $since)),
	'', 'the node never left healthy');

# ---- 3. checks run on time while every connection is busy -----------------------------------
$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('peer1', max_connections => 2)");
@calls = map {
	PeerpoolFleet::psql_start($coord,
		[ 'SET peerpool.query_timeout = 0',
		  q{SELECT x FROM peerpool.pool_query('SELECT pg_sleep(4)::text', 'peer1') AS t(x text)} ])
} 1 .. 2;
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT active >= 2 FROM peerpool.pool_stats WHERE node_name = 'peer1'"),
	'both connections of the node are busy');
# A third caller waits for one of them. The node's growth was refused in part 2: that block,
# long over, once stayed a timer in the past while callers waited, and the loop spun.
my ($growth_worker) = PeerpoolFleet::worker_pids($coord);
push @calls, PeerpoolFleet::psql_start($coord,
	[q{SELECT x FROM peerpool.pool_query('SELECT 1::text', 'peer1') AS t(x text)}]);
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT waiting >= 1 FROM peerpool.pool_stats WHERE node_name = 'peer1'"),
	'a third caller waits');
my $cpu0    = PeerpoolFleet::proc_cpu_seconds($growth_worker);
my $wall0   = time;
my $max_gap = 0;
my $last    = '';
my $changed = time;
my $stop    = time + 2.5;
while (time < $stop)
{
	my $lc = $coord->safe_psql('postgres',
		"SELECT last_check FROM peerpool.node_health WHERE node_name = 'peer1'");
	if ($lc ne $last) { $last = $lc; $changed = time; }
	$max_gap = time - $changed if time - $changed > $max_gap;
	usleep(20_000);
}
note sprintf('longest gap between checks while the pool was busy: %.0f ms', 1000 * $max_gap);
cmp_ok($max_gap, '<', 1.2, 'health checks keep running (interval 300 ms)');
my $cpu_share = (PeerpoolFleet::proc_cpu_seconds($growth_worker) - $cpu0) / (time - $wall0);
note sprintf('pool manager CPU while a caller waited: %.1f %% of a core', 100 * $cpu_share);
cmp_ok($cpu_share, '<', 0.25, 'the pool manager does not spin while a caller waits');
PeerpoolFleet::psql_finish($_) for @calls;
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT total <= 2 FROM peerpool.pool_stats WHERE node_name = 'peer1'"),
	'the check connection beyond max_connections is closed again');
$coord->stop;

# ---- 4. a node registered while another drains -----------------------------------------------
$coord = PeerpoolFleet::coordinator('slots',
	conf => "peerpool.max_nodes = 2\npeerpool.drain_timeout = '30s'\n"
	  . "peerpool.health_check_interval = '300ms'\npeerpool.reconnect_backoff_initial = '300ms'");
my $user = getpwuid($<);
$coord->safe_psql('postgres', sprintf(
	"SELECT peerpool.pool_add_node('a', %s); SELECT peerpool.pool_add_node('b', %s)",
	PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($peer1)),
	PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($peer2))));
ok(defined PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2"),
	'a and b healthy');
my $long = PeerpoolFleet::psql_start($coord,
	[q{SELECT x FROM peerpool.pool_query('SELECT pg_sleep(2)::text', 'a') AS t(x text)}]);
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT active = 1 FROM peerpool.pool_stats WHERE node_name = 'a'"), 'a runs a call');
$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('a')");
$coord->safe_psql('postgres', sprintf("SELECT peerpool.pool_add_node('c', %s)",
	PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($peer1))));
my ($code) = PeerpoolFleet::psql_finish($long);
is($code, 0, "a's call finished during the drain");
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT state = 'healthy' FROM peerpool.node_health WHERE node_name = 'c'"),
	'c starts as soon as the drained slot frees');
is($coord->safe_psql('postgres',
		q{SELECT success FROM peerpool.parallel_query('SELECT 1', ARRAY['c'])}),
	't', 'and serves calls');

# ---- 5. a node that is down rests in unhealthy ------------------------------------------------
$peer2->stop('immediate');
my $seen = PeerpoolFleet::wait_until($coord,
	"SELECT state = 'unhealthy' FROM peerpool.node_health WHERE node_name = 'b'");
ok(defined $seen, "WHERE state = 'unhealthy' finds the stopped peer");
my ($samples, $unhealthy) = (0, 0);
$stop = time + 3;
while (time < $stop)
{
	$samples++;
	$unhealthy++ if $coord->safe_psql('postgres',
		"SELECT state = 'unhealthy' AND retry_attempt >= 1 AND next_retry_at IS NOT NULL FROM peerpool.node_health WHERE node_name = 'b'"
	) eq 't';
	usleep(50_000);
}
note "unhealthy in $unhealthy of $samples samples over 3 s of retries";
cmp_ok($unhealthy / $samples, '>=', 0.8, 'and keeps finding it while it stays down');
my @tr = PeerpoolFleet::transitions(PeerpoolFleet::events($coord, 'b'));
ok((grep { $_ eq 'unhealthy->reconnecting' } @tr) && (grep { $_ eq 'reconnecting->unhealthy' } @tr),
	'each retry is reconnecting while in flight, then unhealthy again');
$peer2->start;
ok(defined PeerpoolFleet::wait_until($coord,
		"SELECT state = 'healthy' FROM peerpool.node_health WHERE node_name = 'b'"),
	'healthy again once the peer is back');

# ---- 6. a shutdown drain under load takes no new work ----------------------------------------
$coord->safe_psql('postgres', q{
CREATE UNLOGGED TABLE calls (started timestamptz, ended timestamptz, sqlstate text);
CREATE FUNCTION hammer(secs float8) RETURNS void LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; stop timestamptz := clock_timestamp() + make_interval(secs => secs);
BEGIN
  WHILE clock_timestamp() < stop LOOP
    t0 := clock_timestamp();
    BEGIN
      PERFORM * FROM peerpool.parallel_query('SELECT pg_sleep(0.2)', ARRAY['c']);
      INSERT INTO calls VALUES (t0, clock_timestamp(), '00000');
    EXCEPTION WHEN OTHERS THEN
      INSERT INTO calls VALUES (t0, clock_timestamp(), SQLSTATE);
      PERFORM pg_sleep(0.01);
    END;
  END LOOP;
END $$;
ALTER SYSTEM SET peerpool.drain_timeout = '10s';
SELECT pg_reload_conf();
});
my @hammers = map { PeerpoolFleet::psql_start($coord, ['SELECT hammer(4)'], timeout => 60) } 1 .. 8;
usleep(1_500_000);
my ($worker) = PeerpoolFleet::worker_pids($coord);
my $signalled = $coord->safe_psql('postgres',
	"SELECT pg_terminate_backend($worker); SELECT clock_timestamp()");
$signalled = (split /\n/, $signalled)[-1];
my $t_signal = time;
my $gone = PeerpoolFleet::wait_until($coord,
	"SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $worker", start => $t_signal);
note sprintf('pool manager exited %.0f ms after SIGTERM under load', 1000 * ($gone // 0));
cmp_ok($gone // 99, '<', 0.2 + 0.5 + 0.5, 'the drain ends with the calls in flight (0.2 s each), not at drain_timeout');
PeerpoolFleet::psql_finish($_) for @hammers;
my ($new_worker) = PeerpoolFleet::worker_pids($coord);
my $after = $coord->safe_psql('postgres', qq{
SELECT count(*) FILTER (WHERE sqlstate = '00000'),
       count(*) FILTER (WHERE sqlstate IN ('57P01', '08006'))
  FROM calls
 WHERE started > '$signalled'::timestamptz + interval '5 ms'
   AND started < (SELECT backend_start FROM pg_stat_activity WHERE pid = $new_worker)});
my ($ran, $refused) = split /\|/, $after;
note "calls submitted after SIGTERM, before the new pool manager: $ran ran, $refused refused";
is($ran, 0, 'no call submitted after SIGTERM ran during the drain');
cmp_ok($refused, '>', 0, 'they failed at once (57P01 while draining, 08006 until the restart)');

PeerpoolFleet::check_logs($coord, $peer1, $peer2);
done_testing();
