# Copyright (c) pg_peerpool contributors
#
# The pool manager's own delay is not the node's latency (SPEC section 3: only the node's own
# behaviour moves it out of healthy). A check's latency runs from sending the query to the
# moment its answer reached this host -- the kernel's receive stamp on the TCP socket -- not to
# the moment the pool manager got the CPU to read it. On a busy coordinator (1,000 peer backends
# sharing 2 CPUs with it) the pool manager waited 10-25 ms for a CPU after each answer, which
# made most of a healthy fleet look degraded (bench/scale.sh).
#
# Reproduction: a peer behind a proxy that holds every message 300 ms (a check takes ~600 ms),
# the pool manager stopped (SIGSTOP) for 2.5 s from just after a check's query reached the peer,
# so the answer waits unread in its socket. With unhealthy_latency = 2 s and
# unhealthy_threshold = 1, measuring to the read (~2.8 s) fails the check and the node goes
# unhealthy; measuring to the arrival (~0.6 s) keeps it serving.
use strict;
use warnings FATAL => 'all';

use lib 't';
use FaultProxy;
use PeerpoolFleet;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $user  = getpwuid($<) // $ENV{USER};
my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '1s'
peerpool.health_check_timeout = '10s'
peerpool.unhealthy_latency = '2s'
peerpool.unhealthy_threshold = 1
peerpool.degraded_latency = '5s'
EOC
my ($peer) = PeerpoolFleet::peers(1);
my $proxy = FaultProxy->new(upstream_port => $peer->port, name => 'px');
END { $proxy->stop if $proxy; }

$proxy->register($coord, $user, 2);
ok(defined PeerpoolFleet::wait_for_health($coord, "bool_and(state = 'healthy')"), 'px healthy');
my ($worker) = PeerpoolFleet::worker_pids($coord);

# Checks now take ~600 ms; the smoothed latency shows it (and stays below both thresholds).
$proxy->delay(300);
ok(defined PeerpoolFleet::wait_for_health($coord, 'bool_and(latency_ms > 400)', 30),
	'the delayed checks are measured (latency above 400 ms)');
is($coord->safe_psql('postgres', 'SELECT state FROM peerpool.node_health'),
	'healthy', 'a 600 ms check is below the thresholds');

for my $round (1 .. 2)
{
	my $before = time;
	# Wait until a check's query has just been forwarded to the peer: its answer reaches the
	# pool manager's socket ~300 ms later.
	my $q0 = $proxy->stats->{msgs_fb_Q} // 0;
	ok(defined $proxy->wait_for(sub { ($_[0]{msgs_fb_Q} // 0) > $q0 }, 10),
		"round $round: a check reached the peer");
	kill 'STOP', $worker;
	my $stopped = time;
	usleep(2_500_000);    # the stop itself: the answer arrives ~0.3 s into it
	kill 'CONT', $worker;
	note sprintf('round %d: pool manager stopped %.2f s', $round, time - $stopped);

	# The check completes once the pool manager runs again; then one more, to be sure the
	# node was judged on that answer.
	ok( defined PeerpoolFleet::wait_for_health($coord,
			sprintf('bool_and(last_check > to_timestamp(%.6f))', time + 0.1), 15),
		"round $round: checks go on after the stop");
	my @bad = grep { $_->{to} eq 'unhealthy' || $_->{to} eq 'reconnecting' }
	  PeerpoolFleet::events($coord, 'px', since => $before);
	is(scalar(@bad), 0, "round $round: the node was not blamed for our stop")
	  or diag explain \@bad;
	my ($state, $latency) = split /\|/,
	  $coord->safe_psql('postgres', 'SELECT state, latency_ms FROM peerpool.node_health');
	is($state, 'healthy', "round $round: still healthy");
	cmp_ok($latency, "<", 900, "round $round: smoothed latency without the stop ($latency ms)");
}

$proxy->pass;
$proxy->stop;
undef $proxy;
PeerpoolFleet::check_logs($coord, $peer);
$coord->stop;
$peer->stop;
done_testing();
