# Copyright (c) pg_peerpool contributors

# Live pools and the health state machine (SPEC sections 3, 4 and 7): peers reach healthy
# with min_connections warm sessions, a killed peer is noticed at once and retried with a
# doubling, capped backoff, a frozen peer (SIGSTOP, no RST) is found by the checks without
# holding up the other nodes, and pool_check_health runs a check on demand.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

# Small settings so that the whole state machine runs in seconds. The check timeout is not
# above the interval, so the checks of a frozen peer fail one per interval.
my %ms = (
	interval        => 200,
	timeout         => 200,
	connect_timeout => 1000,
	backoff_initial => 100,
	backoff_max     => 800);
my $threshold = 3;

# Processes this test froze; thawed on any exit so that teardown never hangs on them.
my @frozen;
END { PeerpoolFleet::thaw(@frozen) if @frozen; }

my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<"EOC");
peerpool.health_check_interval = '$ms{interval}ms'
peerpool.health_check_timeout = '$ms{timeout}ms'
peerpool.unhealthy_threshold = $threshold
peerpool.healthy_threshold = 1
peerpool.connect_timeout = '$ms{connect_timeout}ms'
peerpool.reconnect_backoff_initial = '$ms{backoff_initial}ms'
peerpool.reconnect_backoff_max = '$ms{backoff_max}ms'
peerpool.degraded_latency = '150ms'
EOC
my @peers = PeerpoolFleet::peers(3);
my ($p1, $p2, $p3) = map { $_->name } @peers;
my %peer = map { $_->name => $_ } @peers;
my %min = ($p1 => 2, $p2 => 1, $p3 => 1);

# One node's column from node_health.
sub health
{
	my ($name, $col) = @_;
	return $coord->safe_psql('postgres',
		"SELECT $col FROM peerpool.node_health WHERE node_name = '$name'");
}

# One node's column from pool_stats.
sub stat_of
{
	my ($name, $col) = @_;
	return $coord->safe_psql('postgres',
		"SELECT $col FROM peerpool.pool_stats WHERE node_name = '$name'");
}

# Wait until every named node is healthy (retry state cleared).
sub wait_healthy
{
	my ($names, %opts) = @_;
	my $list = join(', ', map { "'$_'" } @$names);
	return PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name IN ($list) AND state = 'healthy' AND retry_attempt = 0) = "
		  . scalar(@$names),
		$opts{timeout}, %opts);
}

# ---------------------------------------------------------------------------------------
# The SQL objects this issue adds have the contract's columns.

my $columns = sub {
	my ($rel) = @_;
	return $coord->safe_psql('postgres',
		"SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns"
		  . " WHERE table_schema = 'peerpool' AND table_name = '$rel'");
};
is($columns->('pool_stats'),
	'node_name,state,total,active,idle,waiting,created,closed,recycled,acquires,acquire_timeouts,queries,errors,avg_query_ms',
	'pool_stats has the contract columns');
is($columns->('events'), 'at,node_name,from_state,to_state,reason',
	'events has the contract columns');
# A view over the call shows its result columns without running it.
is( $coord->safe_psql('postgres',
		q{CREATE TEMP VIEW check_cols AS SELECT * FROM peerpool.pool_check_health(NULL);
		  SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
		  WHERE attrelid = 'check_cols'::regclass AND attnum > 0}),
	$columns->('node_health'),
	'pool_check_health returns the node_health columns');

# ---------------------------------------------------------------------------------------
# Three peers reach healthy: disconnected -> connecting -> healthy, role detected.

my $t0 = time;
PeerpoolFleet::register($coord, { sql_extra => "min_connections => $min{$p1}" }, $peers[0]);
PeerpoolFleet::register($coord, @peers[ 1, 2 ]);
PeerpoolFleet::timed_ok(wait_healthy([ $p1, $p2, $p3 ], start => $t0),
	5, 'three peers healthy after registration');

for my $name ($p1, $p2, $p3)
{
	is_deeply(
		[ PeerpoolFleet::transitions(PeerpoolFleet::events($coord, $name)) ],
		[ 'disconnected->connecting', 'connecting->healthy' ],
		"$name: events disconnected -> connecting -> healthy");
	is( health($name,
			"role || ',' || (last_check IS NOT NULL) || ',' || (last_success IS NOT NULL) || ','"
			  . " || consecutive_failures || ',' || (latency_ms >= 0) || ','"
			  . " || (replication_lag_ms IS NULL) || ',' || retry_attempt || ','"
			  . " || (next_retry_at IS NULL) || ',' || (last_error IS NULL)"),
		'primary,true,true,0,true,true,0,true,true',
		"$name: node_health shows a checked primary, no lag, no retry, no error");
}

# ---------------------------------------------------------------------------------------
# Each peer sees exactly min_connections sessions named by peerpool.application_name,
# steadily (health checks reuse them), and pool_stats.total agrees.

for my $name ($p1, $p2, $p3)
{
	ok( PeerpoolFleet::wait_until(
			$peer{$name},
			"SELECT count(*) = $min{$name} FROM pg_stat_activity WHERE application_name = 'pg_peerpool'",
			timeout => 10),
		"$name: $min{$name} pooled session(s) appear on the peer");
}
my %bad;
for my $sample (1 .. 5)
{
	for my $name ($p1, $p2, $p3)
	{
		my $n = PeerpoolFleet::remote_sessions($peer{$name});
		my $total = stat_of($name, 'total');
		$bad{$name} .= " sample $sample: sessions=$n total=$total"
		  if $n != $min{$name} || $total != $min{$name};
	}
	Time::HiRes::usleep(200_000) if $sample < 5;    # spread samples over ~1 s of checks
}
for my $name ($p1, $p2, $p3)
{
	is($bad{$name} // '', '',
		"$name: exactly $min{$name} session(s) on the peer and pool_stats.total = $min{$name} over 1 s");
}
is( $coord->safe_psql('postgres',
		q{SELECT count(*) FROM peerpool.pool_stats s JOIN peerpool.node_health h USING (node_name)
		  WHERE s.state = h.state AND s.created >= s.total AND s.waiting = 0}),
	'3', 'pool_stats: state as in node_health, created >= total, nobody waiting');
is( $coord->safe_psql('postgres',
		q{SELECT (SELECT count(*) FROM peerpool.pool_stats()) = 3
		     AND (SELECT sum(total) FROM peerpool.pool_stats()) = 4}),
	't', 'the pool_stats() function returns the same pools');

# pool_reset_stats zeroes the counters (nothing opens or closes connections in a steady fleet).
$coord->safe_psql('postgres', 'SELECT peerpool.pool_reset_stats()');
is( $coord->safe_psql('postgres',
		q{SELECT string_agg(node_name || ':' || created || ',' || closed || ',' || recycled || ','
		  || acquire_timeouts, ' ' ORDER BY node_name) FROM peerpool.pool_stats}),
	"$p1:0,0,0,0 $p2:0,0,0,0 $p3:0,0,0,0",
	'pool_reset_stats zeroes created, closed, recycled and acquire_timeouts');

# ---------------------------------------------------------------------------------------
# A peer stopped in immediate mode leaves healthy within 0.5 s: its pooled connections
# break, the worker notices at once, checks, and the refused connection is a hard failure.

my $s = PeerpoolFleet::session($coord);
PeerpoolFleet::watch_start($s,
	"SELECT state <> 'healthy' FROM peerpool.node_health WHERE node_name = '$p1'", 10);
# The immediate stop is our own SIGQUIT to the postmaster, so the clock starts when the peer
# is killed (pg_ctl's own start-up took up to 1.5 s on a loaded machine); pg_ctl then only
# records the stop.
my $postmaster = $peer{$p1}->{_pid};
my $stop_start = time;
kill 'QUIT', $postmaster;
$peer{$p1}->stop('immediate', fail_ok => 1);
my $stop_return = time;
ok(!defined $peer{$p1}->{_pid}, "$p1 is stopped");
my $seen = PeerpoolFleet::watch_finish($s);
ok(defined $seen, "$p1 left healthy after the immediate stop");
$seen //= 9**9**9;
note sprintf(
	'%s left healthy %.1f ms after the SIGQUIT to its postmaster (pid %d; pg_ctl returned %.1f ms after it)',
	$p1, 1000 * ($seen - $stop_start), $postmaster, 1000 * ($stop_return - $stop_start));
cmp_ok($seen - $stop_start, '<', 0.5, "$p1 left healthy within 0.5 s of the kill");

# The retries back off: 100, 200, 400, 800, 800 ... ms, each at most 10 % less (jitter).
my $retry_re = qr/retry (\d+) in (\d+) ms/;
my $elapsed = PeerpoolFleet::wait_until(
	$coord,
	"SELECT count(*) >= 6 FROM peerpool.events WHERE node_name = '$p1' AND reason ~ 'retry [0-9]+ in [0-9]+ ms'",
	timeout => 15,
	start   => $stop_return);
ok(defined $elapsed, "$p1: six retries logged in peerpool.events");
note sprintf('six retries after %.1f ms', 1000 * ($elapsed // 0));
# Down, it rests in unhealthy between attempts (SPEC section 3); reconnecting lasts only while
# an attempt is in flight (here: a refused connection, so a moment).
ok( defined PeerpoolFleet::wait_until($coord,
		"SELECT state = 'unhealthy' AND retry_attempt >= 1 AND next_retry_at IS NOT NULL"
		  . " AND last_error IS NOT NULL FROM peerpool.node_health WHERE node_name = '$p1'",
		timeout => 5),
	"$p1: unhealthy with retry_attempt, next_retry_at and last_error set");
note "$p1 last_error: " . health($p1, 'last_error');

my @after_stop = PeerpoolFleet::events($coord, $p1, since => $stop_start);
my @trans = PeerpoolFleet::transitions(@after_stop);
is_deeply([ @trans[ 0, 1 ] ], [ 'healthy->unhealthy', 'unhealthy->reconnecting' ],
	"$p1: healthy -> unhealthy -> reconnecting");
note "$p1 events after the stop:\n"
  . join("\n", map { sprintf('  %.3f %s->%s: %s', $_->{at_epoch} - $stop_start, $_->{from}, $_->{to}, $_->{reason}) } @after_stop);

my @retries = map { $_->{reason} =~ $retry_re ? { n => $1, ms => $2, at => $_->{at_epoch}, tr => "$_->{from}->$_->{to}" } : () }
  @after_stop;
cmp_ok(scalar @retries, '>=', 6, "$p1: at least six 'retry N in M ms' events");
is(scalar(grep { $_->{tr} ne 'reconnecting->unhealthy' && $_->{tr} ne 'healthy->unhealthy' } @retries),
	0, "$p1: retry reasons only on transitions to unhealthy");
is(scalar(grep { $_->{from} eq 'unhealthy' && $_->{to} eq 'reconnecting' && $_->{reason} !~ /^attempt \d+$/ } @after_stop),
	0, "$p1: each attempt is announced as unhealthy -> reconnecting: attempt N");
my @problems;
my $capped = 0;
for my $i (0 .. $#retries)
{
	my $r = $retries[$i];
	my $nominal = $ms{backoff_initial} * 2**($r->{n} - 1);
	$nominal = $ms{backoff_max} if $nominal > $ms{backoff_max};
	push @problems, "retry $r->{n} in $r->{ms} ms: expected 0.9 x $nominal .. $nominal"
	  if $r->{ms} < int(0.9 * $nominal) - 1 || $r->{ms} > $nominal;
	$capped++ if $r->{ms} >= 0.9 * $ms{backoff_max} - 1;
	next if $i == 0;
	my $prev = $retries[ $i - 1 ];
	push @problems, "retry $r->{n} follows retry $prev->{n}" if $r->{n} != $prev->{n} + 1;
	my $want = 2 * $prev->{ms};
	$want = $ms{backoff_max} if $want > $ms{backoff_max};
	push @problems, "retry $r->{n} in $r->{ms} ms < 0.9 x $want (previous $prev->{ms} ms)"
	  if $r->{ms} < 0.9 * $want - 1;
	# The failed retry is logged when it happens, i.e. the announced delay after the
	# previous event (refused connections fail at once).
	my $gap = 1000 * ($r->{at} - $prev->{at});
	note sprintf('retry %d announced %d ms, next event after %.1f ms', $prev->{n}, $prev->{ms}, $gap);
	push @problems, sprintf('retry %d came %.1f ms after it was announced in %d ms', $prev->{n}, $gap, $prev->{ms})
	  if $gap < $prev->{ms} - 10 || $gap > $prev->{ms} + 1000;
}
is(join("\n", @problems), '', "$p1: delays double from $ms{backoff_initial} ms up to $ms{backoff_max} ms, with at most 10 % jitter, and are honoured");
cmp_ok($capped, '>=', 2, "$p1: the delay reached the cap of $ms{backoff_max} ms and stayed there");

# The peer comes back: healthy again, retry state cleared, min_connections warm again.
$peer{$p1}->start;
my $start_return = time;
PeerpoolFleet::timed_ok(wait_healthy([$p1], start => $start_return, timeout => 15),
	$ms{backoff_max} / 1000 + 2, "$p1 healthy again after restart");
is(health($p1, "retry_attempt || ',' || (next_retry_at IS NULL)"), '0,true',
	"$p1: retry_attempt back to 0");
my @p1_events = PeerpoolFleet::events($coord, $p1);
is($p1_events[-1]{to}, 'healthy', "$p1: the last event is a transition to healthy");
ok( PeerpoolFleet::wait_until(
		$peer{$p1},
		"SELECT count(*) = $min{$p1} FROM pg_stat_activity WHERE application_name = 'pg_peerpool'",
		timeout => 10),
	"$p1: $min{$p1} sessions on the restarted peer");
cmp_ok(stat_of($p1, 'closed'), '>=', $min{$p1}, "$p1: pool_stats counts the broken connections as closed");
cmp_ok(stat_of($p1, 'created'), '>=', $min{$p1}, "$p1: pool_stats counts the new connections as created");

# ---------------------------------------------------------------------------------------
# A frozen peer (SIGSTOP on the postmaster and all its children: sockets stay open, nothing
# answers) becomes unhealthy within interval x threshold + timeout, while the other nodes
# keep being checked.

ok(wait_healthy([ $p1, $p2, $p3 ]), 'all peers healthy before the freeze');
my $limit = ($ms{interval} * $threshold + $ms{timeout}) / 1000;
my $slack = 0.4;
my $t_freeze = time;
@frozen = PeerpoolFleet::freeze($peer{$p2});
note "froze $p2: pids @frozen";
$elapsed = PeerpoolFleet::wait_until(
	$coord,
	"SELECT count(*) > 0 FROM peerpool.events WHERE node_name = '$p2' AND to_state = 'unhealthy'"
	  . sprintf(' AND at > to_timestamp(%.6f)', $t_freeze),
	timeout => 15,
	start   => $t_freeze);
ok(defined $elapsed, "$p2 became unhealthy while frozen");
my ($unhealthy) = grep { $_->{to} eq 'unhealthy' } PeerpoolFleet::events($coord, $p2, since => $t_freeze);
my $detect = defined $unhealthy ? $unhealthy->{at_epoch} - $t_freeze : 9**9**9;
note sprintf('%s unhealthy %.1f ms after SIGSTOP (event time; seen by polling after %.1f ms); '
	  . 'bound interval x threshold + timeout = %.0f ms', $p2, 1000 * $detect, 1000 * ($elapsed // 0), 1000 * $limit);
note "$p2 unhealthy reason: " . ($unhealthy->{reason} // '(none)');
cmp_ok($detect, '<', $limit + $slack,
	sprintf('%s unhealthy within interval x threshold + timeout (+%.1f s slack)', $p2, $slack));
# Failed retries while it stays frozen come back as reconnecting -> unhealthy; the node itself
# left healthy once (no flapping).
is( join(',', map { $_->{from} . '->' . $_->{to} } grep { $_->{to} eq 'unhealthy' && $_->{from} ne 'reconnecting' }
		PeerpoolFleet::events($coord, $p2, since => $t_freeze)),
	'healthy->unhealthy', "$p2: one healthy -> unhealthy transition");

# The other peers are healthy and their checks keep coming while p2 is frozen.
my %last = map {
	$_ => health($_, 'extract(epoch FROM last_check)')
} ($p1, $p3);
for my $name ($p1, $p3)
{
	is(health($name, 'state'), 'healthy', "$name stays healthy while $p2 is frozen");
	cmp_ok($last{$name}, '>', $t_freeze, "$name was checked after the freeze");
	ok( PeerpoolFleet::wait_for_health(
			$coord,
			"bool_and(extract(epoch FROM last_check) > $last{$name}) FILTER (WHERE node_name = '$name')",
			2),
		"$name: last_check keeps advancing while $p2 is frozen");
}
is(health($p2, 'last_error IS NOT NULL'), 't', "$p2: last_error set");
note "$p2 last_error: " . health($p2, 'last_error');

my $t_thaw = time;
PeerpoolFleet::thaw(@frozen);
@frozen = ();
PeerpoolFleet::timed_ok(wait_healthy([$p2], start => $t_thaw, timeout => 15),
	($ms{connect_timeout} + $ms{backoff_max}) / 1000 + 2, "$p2 healthy again after SIGCONT");

# ---------------------------------------------------------------------------------------
# pool_check_health runs a check now and returns fresh node_health rows.

for my $try (1 .. 3)
{
	my $before = $coord->safe_psql('postgres', 'SELECT clock_timestamp()');
	is( $coord->safe_psql('postgres',
			"SELECT node_name || ',' || state || ',' || (last_check > '$before'::timestamptz)"
			  . " FROM peerpool.pool_check_health('$p3')"),
		"$p3,healthy,true",
		"pool_check_health('$p3') returns one row checked after the call started (try $try)");
}
my $before = $coord->safe_psql('postgres', 'SELECT clock_timestamp()');
is( $coord->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE last_check > '$before'::timestamptz) || '/' || count(*)"
		  . ' FROM peerpool.pool_check_health()'),
	'3/3', 'pool_check_health() checks every node');
my ($ret, $err) = PeerpoolFleet::psql_error($coord, "SELECT * FROM peerpool.pool_check_health('nope');");
isnt($ret, 0, 'pool_check_health of an unknown node fails');
like($err, qr/ERROR:\s+42704:/, 'unknown node: SQLSTATE 42704');
note "pool_check_health('nope') said:\n$err";

# ---------------------------------------------------------------------------------------

$s->quit;
PeerpoolFleet::check_logs($coord, @peers);
$_->stop for ($coord, @peers);

done_testing();
