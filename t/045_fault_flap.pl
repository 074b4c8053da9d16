# Copyright (c) pg_peerpool contributors

# A flapping peer (issue 11 item 2): one peer is stopped (immediate) and started again every
# 0.5-2 s while a client calls parallel_query over it and a stable peer in a loop, with
# timeout_ms => 1000. No call exceeds its timeout + 1 s, the stable peer answers every
# call, the pool manager's CPU stays low, and once the flapping stops the node is healthy
# with its pool within bounds. PEERPOOL_FLAP_SECONDS sets the length (default 20; the
# issue's 60 s with PEERPOOL_FLAP_SECONDS=60).

use strict;
use warnings FATAL => 'all';

use POSIX ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $seconds = $ENV{PEERPOOL_FLAP_SECONDS} // 20;
my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
peerpool.health_check_timeout = '500ms'
peerpool.unhealthy_threshold = 2
peerpool.connect_timeout = '1s'
peerpool.reconnect_backoff_initial = '100ms'
peerpool.reconnect_backoff_max = '1s'
EOC
my ($flap, $stable) = PeerpoolFleet::peers(2, prefix => 'node');
my ($fn, $sn) = ($flap->name, $stable->name);
PeerpoolFleet::register($coord, { sql_extra => 'min_connections => 2, max_connections => 4' }, $flap, $stable);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 10),
	10, 'both peers healthy');

my ($worker) = PeerpoolFleet::worker_pids($coord);

# The client loop runs inside the coordinator: every call timed with clock_timestamp().
my $loop = PeerpoolFleet::psql_start($coord, [
	qq{CREATE FUNCTION pg_temp.flap_loop(secs float8, OUT calls int, OUT stable_ok int, OUT flap_ok int,
    OUT max_ms float8, OUT slow_calls int)
LANGUAGE plpgsql AS \$\$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => secs);
    t timestamptz;
    a int;
    b int;
    ms float8;
BEGIN
    calls := 0; stable_ok := 0; flap_ok := 0; max_ms := 0; slow_calls := 0;
    WHILE clock_timestamp() < deadline LOOP
        t := clock_timestamp();
        SELECT count(*) FILTER (WHERE node_name = '$sn' AND success),
               count(*) FILTER (WHERE node_name = '$fn' AND success)
          INTO a, b
          FROM peerpool.parallel_query('SELECT 1', ARRAY['$fn', '$sn'], timeout_ms => 1000);
        ms := extract(epoch FROM clock_timestamp() - t) * 1000;
        calls := calls + 1;
        stable_ok := stable_ok + a;
        flap_ok := flap_ok + b;
        max_ms := greatest(max_ms, ms);
        IF ms > 2000 THEN slow_calls := slow_calls + 1; END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
END \$\$},
	"SELECT calls || ' ' || stable_ok || ' ' || flap_ok || ' ' || round(max_ms::numeric, 1) || ' ' || slow_calls FROM pg_temp.flap_loop($seconds)" ],
	timeout => $seconds + 60);

my $cpu0 = PeerpoolFleet::proc_cpu_seconds($worker);
my $t0 = time;
my $stops = 0;
srand(42);
while (time - $t0 < $seconds - 1)
{
	$flap->stop('immediate');
	$stops++;
	usleep(int(1_000_000 * (0.5 + rand 1.5)));
	$flap->start;
	usleep(int(1_000_000 * (0.5 + rand 1.5)));
}
my ($ret, $out, $err) = PeerpoolFleet::psql_finish($loop);
my $wall = time - $t0;
my $cpu = PeerpoolFleet::proc_cpu_seconds($worker) - $cpu0;
chomp $out;
my ($calls, $stable_ok, $flap_ok, $max_ms, $slow) = split ' ', ($out // '');
note sprintf('%d stop/start cycles in %.1f s; %s calls: stable answered %s, flapping answered %s; slowest call %s ms, %s over 2 s; '
	  . 'pool manager CPU %.2f s (%.1f %% of one core)',
	$stops, $wall, $calls // '?', $stable_ok // '?', $flap_ok // '?', $max_ms // '?', $slow // '?', $cpu, 100 * $cpu / $wall);
is($ret, 0, 'the client loop ran') or diag $err;
cmp_ok($calls // 0, '>', 10, 'the client made calls throughout');
is($stable_ok, $calls, 'the stable peer answered every call');
cmp_ok($flap_ok // 0, '>', 0, 'the flapping peer answered some calls');
cmp_ok($max_ms // 9**9**9, '<', 2000, 'no call exceeded its timeout (1 s) + 1 s');
cmp_ok($cpu / $wall, '<', 0.5, 'the pool manager used less than half a core');

my $t1 = time;
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 30, start => $t1),
	15, 'the flapping peer is healthy once it stays up');
ok( PeerpoolFleet::wait_until($coord,
		q{SELECT bool_and(total <= 4 AND active = 0 AND total = active + idle) FROM peerpool.pool_stats}, timeout => 10),
	'pool_stats within bounds, nothing active');
ok( PeerpoolFleet::wait_until($flap,
		q{SELECT count(*) <= 4 FROM pg_stat_activity WHERE application_name = 'pg_peerpool'}, timeout => 10),
	'the flapping peer holds no more sessions of ours than max_connections');
my @ev = PeerpoolFleet::events($coord, $fn, since => $t0);
note sprintf('%s: %d state changes during the flapping', $fn, scalar @ev);
is_deeply([ PeerpoolFleet::worker_pids($coord) ], [$worker], 'the same pool manager throughout');

PeerpoolFleet::check_logs($coord, $stable);
$_->stop for ($coord, $flap, $stable);

done_testing();
