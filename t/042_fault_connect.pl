# Copyright (c) pg_peerpool contributors

# Connect-time faults through t/FaultProxy.pm (issue 11 item 2): a node whose connections
# hang at connect (the proxy accepts and forwards nothing: a black hole after the TCP
# handshake) fails after peerpool.connect_timeout, calls to other nodes stay fast while it
# hangs, and a reload (SIGHUP) of connect_timeout applies to the next attempts; a slow
# connect inside connect_timeout succeeds; a slow link (every message delayed) makes the
# node degraded, not unhealthy, and it keeps serving; and it recovers when the link does.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use FaultProxy;
use PeerpoolFleet;

my $user = getpwuid($<) // $ENV{USER};
my ($peer1, $peer2) = PeerpoolFleet::peers(2, conf => "client_connection_check_interval = '100ms'");
my $proxy = FaultProxy->new(upstream_port => $peer1->port, name => 'hole');
END { $proxy->stop if $proxy; }

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
peerpool.health_check_timeout = '500ms'
peerpool.unhealthy_threshold = 2
peerpool.connect_timeout = '2s'
peerpool.reconnect_backoff_initial = '200ms'
peerpool.reconnect_backoff_max = '500ms'
peerpool.degraded_latency = '70ms'
EOC
$coord->safe_psql('postgres', sprintf(q{SELECT peerpool.pool_add_node('direct', %s)},
		PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($peer2))));
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 1", 10),
	10, 'direct healthy');

my $bs = $coord->background_psql('postgres');

# parallel_query through the persistent session: (wall seconds, { node => [ok, ms, error] }).
sub pq
{
	my ($nodes, $extra) = @_;
	my $start = time;
	my $out = $bs->query_safe(sprintf(
		q{SELECT node_name, success, round(elapsed_ms::numeric, 1), coalesce(error, '')
  FROM peerpool.parallel_query('SELECT 1', ARRAY[%s]%s)},
		join(', ', map { "'$_'" } @$nodes), $extra // ''));
	my $secs = time - $start;
	my %rows = map { my @f = split /\|/, $_, 4; ($f[0] => [ @f[ 1 .. 3 ] ]) } split /\n/, $out;
	return ($secs, \%rows);
}

sub state_of
{
	my ($name) = @_;
	return $coord->safe_psql('postgres',
		"SELECT state || ' | ' || coalesce(last_error, '') FROM peerpool.node_health WHERE node_name = '$name'");
}

# ---------------------------------------------------------------------------------------
# Black hole at connect: the node fails after connect_timeout; the others stay fast.

$proxy->freeze;
my $t0 = time;
$coord->safe_psql('postgres', sprintf(q{SELECT peerpool.pool_add_node('hole', %s)},
		PeerpoolFleet::quote($proxy->conninfo($user))));

my ($worst_wall, $worst_ms, $calls) = (0, 0, 0);
my $hole_row;
while (time - $t0 < 1.5)
{
	my ($secs, $rows) = pq([ 'direct', 'hole' ], ', timeout_ms => 5000');
	$calls++;
	$worst_wall = $secs if $secs > $worst_wall;
	$worst_ms = $rows->{direct}[1] if $rows->{direct}[1] > $worst_ms;
	is($rows->{direct}[0], 't', 'while hole hangs at connect: direct answers') if $rows->{direct}[0] ne 't';
	$hole_row //= $rows->{hole};
}
note sprintf('while hole hangs at connect: %d calls over direct and hole, worst %.1f ms (wall), direct worst %.1f ms; hole said: %s',
	$calls, 1000 * $worst_wall, $worst_ms, join(' ', @{ $hole_row // [] }));
cmp_ok($worst_ms, '<', 100, 'while hole hangs at connect: direct answers within 100 ms');
cmp_ok($worst_wall, '<', 1, 'while hole hangs at connect: no call waits for it');
is($hole_row->[0], 'f', 'a call to the connecting node fails rather than waits');

my $down = PeerpoolFleet::wait_for_health($coord,
	q{count(*) FILTER (WHERE node_name = 'hole' AND state IN ('unhealthy', 'reconnecting')) = 1}, 15, start => $t0);
ok(defined $down, 'the hanging node is given up');
note sprintf('hole given up %.1f ms after it was added (connect_timeout 2 s): %s', 1000 * ($down // 0), state_of('hole'));
cmp_ok($down // 0, '>=', 1.9, 'not before connect_timeout');
cmp_ok($down // 9**9**9, '<', 2 + 1.5, 'within connect_timeout + 1.5 s');
like(state_of('hole'), qr/timeout expired after 2000 ms/, 'last_error names the connect timeout');

# SIGHUP: a lower connect_timeout applies to the next attempts.
my $t1 = time;
PeerpoolFleet::set_gucs($coord, 'peerpool.connect_timeout' => '1s');
my $applied = PeerpoolFleet::wait_until($coord,
	q{SELECT count(*) > 0 FROM peerpool.events WHERE node_name = 'hole' AND reason LIKE '%timeout expired after 1000 ms%'},
	timeout => 15, start => $t1);
ok(defined $applied, 'after a reload, attempts time out after the new connect_timeout (1000 ms)');
note sprintf('connect_timeout 1s seen in an attempt %.1f ms after the reload', 1000 * ($applied // 0));
note 'hole events: ' . join(', ', map { "$_->{from}->$_->{to} ($_->{reason})" }
	  PeerpoolFleet::events($coord, 'hole', since => $t0));

# The link comes back: healthy within the backoff and a check.
my $t2 = time;
$proxy->pass;
my $up = PeerpoolFleet::wait_for_health($coord,
	q{count(*) FILTER (WHERE node_name = 'hole' AND state = 'healthy') = 1}, 15, start => $t2);
PeerpoolFleet::timed_ok($up, 1 + 0.5 + 1.5, 'hole healthy after the link is back (connect_timeout + backoff max + slack)');
PeerpoolFleet::set_gucs($coord, 'peerpool.connect_timeout' => '2s');

# ---------------------------------------------------------------------------------------
# A slow connect inside connect_timeout succeeds: the pool grows through a 1 s connect delay.

$proxy->connect_delay(1000);
note 'before: ' . $coord->safe_psql('postgres',
	q{SELECT format('total %s active %s idle %s', total, active, idle) FROM peerpool.pool_stats WHERE node_name = 'hole'});
my $t3 = time;
$coord->safe_psql('postgres', q{SELECT peerpool.pool_alter_node('hole', min_connections => 2)});
my $grown = PeerpoolFleet::wait_until($coord,
	q{SELECT idle + active >= 2 FROM peerpool.pool_stats WHERE node_name = 'hole'}, timeout => 15, start => $t3);
ok(defined $grown, 'a connection delayed by 1 s (connect_timeout 2 s) is made');
note sprintf('second connection ready %.1f ms after min_connections => 2 (connect delay 1000 ms)', 1000 * ($grown // 0));
cmp_ok($grown // 0, '>=', 1, 'it waited for the delayed connect');
like(state_of('hole'), qr/^healthy/, 'hole stayed healthy');
$proxy->pass;

# ---------------------------------------------------------------------------------------
# A slow link: every message delayed by 60 ms, so a check takes >= 120 ms against
# degraded_latency = 70 ms: degraded (serving), not unhealthy; healthy again afterwards.

my $t4 = time;
$proxy->delay(60);
my $degraded = PeerpoolFleet::wait_for_health($coord,
	q{count(*) FILTER (WHERE node_name = 'hole' AND state = 'degraded') = 1}, 20, start => $t4);
ok(defined $degraded, 'a 60 ms delay per message makes hole degraded');
note sprintf('degraded %.1f ms after the delay began: %s (latency_ms %s)', 1000 * ($degraded // 0), state_of('hole'),
	$coord->safe_psql('postgres', q{SELECT round(latency_ms::numeric, 1) FROM peerpool.node_health WHERE node_name = 'hole'}));
my ($secs, $rows) = pq([ 'hole', 'direct' ], ', timeout_ms => 5000');
note sprintf('degraded: a call to hole and direct: hole %s %s ms, direct %s %s ms', @{ $rows->{hole} }[ 0, 1 ],
	@{ $rows->{direct} }[ 0, 1 ]);
is("$rows->{hole}[0],$rows->{direct}[0]", 't,t', 'degraded hole still answers');
cmp_ok($rows->{hole}[1], '>=', 110, 'through the slow link (>= one delayed round trip)');
my $unhealthy_seen = grep { $_->{to} eq 'unhealthy' } PeerpoolFleet::events($coord, 'hole', since => $t4);
is($unhealthy_seen, 0, 'a slow link never made it unhealthy');

my $t5 = time;
$proxy->pass;
my $healthy = PeerpoolFleet::wait_for_health($coord,
	q{count(*) FILTER (WHERE node_name = 'hole' AND state = 'healthy') = 1}, 30, start => $t5);
ok(defined $healthy, 'healthy again once the link is fast');
note sprintf('healthy %.1f ms after the delay ended', 1000 * ($healthy // 0));
note 'hole events: ' . join(', ', map { "$_->{from}->$_->{to} ($_->{reason})" }
	  PeerpoolFleet::events($coord, 'hole', since => $t3));

# ---------------------------------------------------------------------------------------
# Every current and future connection reset (the peer is gone, RST): the node leaves
# healthy at once (SPEC section 9: a killed peer within 0.5 s), calls to it fail at once
# with an error naming it, direct is untouched; after pass it comes back.

{
	ok( PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 15),
		'refuse: both healthy first');
	my $s = PeerpoolFleet::session($coord);
	PeerpoolFleet::watch_start($s,
		q{SELECT count(*) = 1 FROM peerpool.node_health WHERE node_name = 'hole' AND state NOT IN ('healthy', 'degraded')}, 20);
	my $t6 = time;
	$proxy->refuse;
	my $left = PeerpoolFleet::watch_finish($s);
	$s->quit;
	ok(defined $left, 'refuse: hole left healthy');
	note sprintf('refuse: hole left healthy %.1f ms after every connection was reset: %s',
		1000 * (($left // 0) - $t6), state_of('hole'));
	cmp_ok(($left // 9**9**9) - $t6, '<', 0.5, 'refuse: within 0.5 s');
	my ($secs, $rows) = pq([ 'hole', 'direct' ], ', timeout_ms => 5000');
	note sprintf('refuse: a call: hole %s %s ms "%s", direct %s %s ms', @{ $rows->{hole} }, @{ $rows->{direct} }[ 0, 1 ]);
	is("$rows->{hole}[0],$rows->{direct}[0]", 'f,t', 'refuse: hole fails, direct answers');
	like($rows->{hole}[2], qr/node "hole"/, 'refuse: the error names the node');
	cmp_ok($rows->{hole}[1], '<', 100, 'refuse: hole fails at once');
	my $t7 = time;
	$proxy->pass;
	my $back = PeerpoolFleet::wait_for_health($coord,
		q{count(*) FILTER (WHERE node_name = 'hole' AND state IN ('healthy', 'degraded')) = 1}, 15, start => $t7);
	PeerpoolFleet::timed_ok($back, 0.5 + 1 + 1.5, 'refuse, then pass: hole serves again (backoff max + a check + slack)');
	cmp_ok($proxy->stats->{refused}, '>=', 1, 'refuse: the proxy refused reconnects');
}

$bs->quit;
my $st = $proxy->stats;
note 'proxy: ' . join(' ', map { "$_=$st->{$_}" } grep { !/^msgs_/ } sort keys %$st);
$proxy->stop;
PeerpoolFleet::check_logs($coord, $peer1, $peer2);
$_->stop for ($coord, $peer1, $peer2);

done_testing();
