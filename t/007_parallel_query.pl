# Copyright (c) pg_peerpool contributors

# parallel_query() against a real fleet (SPEC section 5): the same question to three peers
# at once takes about as long as asking one; a stopped peer fails fast and a frozen one
# (SIGSTOP, no RST) fails at the per-node deadline, while the others answer; a timed-out
# remote query is cancelled on the peer; results are typed jsonb from the node that ran
# them; unknown names are refused.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

# Processes this test froze; thawed on any exit so that teardown never hangs on them.
my @frozen;
END { PeerpoolFleet::thaw(@frozen) if @frozen; }

# Checks every second with a 1 s timeout: a frozen peer needs several failed checks
# (seconds) to become unhealthy, so a call right after the freeze meets a node that is
# still "healthy" and must be bounded by its own deadline.
my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<'EOC');
peerpool.health_check_interval = '1s'
peerpool.health_check_timeout = '1s'
peerpool.unhealthy_threshold = 3
peerpool.connect_timeout = '2s'
peerpool.reconnect_backoff_initial = '100ms'
peerpool.reconnect_backoff_max = '500ms'
EOC
my @peers = PeerpoolFleet::peers(3);
my ($p1, $p2, $p3) = map { $_->name } @peers;
my %peer = map { $_->name => $_ } @peers;
my @names = ($p1, $p2, $p3);
my $all = 'ARRAY[' . join(', ', map { "'$_'" } @names) . ']';

PeerpoolFleet::register($coord, @peers);

sub wait_healthy
{
	my ($names, %opts) = @_;
	my $list = join(', ', map { "'$_'" } @$names);
	return PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name IN ($list) AND state = 'healthy') = " . scalar(@$names),
		$opts{timeout}, %opts);
}

# The rows of a parallel_query call as hashrefs, in the order returned, and the call's
# wall time as the client sees it (Time::HiRes around one round trip of a persistent psql
# session, so that psql start-up does not blur the timings). $prefix: statements to run
# in the same round trip first.
my $bs = $coord->background_psql('postgres');

sub pq
{
	my ($args, $prefix) = @_;
	my $start = time;
	my $out = $bs->query_safe(($prefix // '')
		  . "SELECT node_name, success, coalesce(error, ''), round(elapsed_ms::numeric, 1),"
		  . " coalesce(result::text, '') FROM peerpool.parallel_query($args)");
	my $secs = time - $start;
	my @rows;
	for my $line (split /\n/, $out)
	{
		my ($name, $ok, $error, $ms, $result) = split /\|/, $line, 5;
		push @rows,
		  { name => $name, ok => $ok, error => $error, ms => $ms, result => $result };
	}
	return ($secs, @rows);
}

sub describe
{
	return join('; ', map { "$_->{name}: $_->{ok} $_->{ms} ms $_->{error}" } @_);
}

PeerpoolFleet::timed_ok(wait_healthy(\@names), 10, 'three peers healthy');

# ---------------------------------------------------------------------------------------
# Shape: one row per target, in the order given; NULL means every enabled node by name.

my ($secs, @rows) = pq("'SELECT 1 AS one', ARRAY['$p3', '$p1', '$p2']");
is(join(',', map { $_->{name} } @rows), "$p3,$p1,$p2", 'rows come in the order the nodes were given');
is(join(',', map { $_->{ok} } @rows), 't,t,t', 'every node answered');
is(join(',', map { $_->{result} } @rows), join(',', ('[{"one": 1}]') x 3), 'each result is [{"one": 1}]');

($secs, @rows) = pq("'SELECT 1 AS one'");
is(join(',', map { $_->{name} } @rows), "$p1,$p2,$p3", 'NULL nodes: every enabled node, by name');

# Each row holds the answer of the node it names (cluster_name is the peer's own name).
($secs, @rows) = pq(q{'SELECT current_setting(''cluster_name'') AS me, inet_server_port() AS port'});
is( join(',', map { $_->{result} } @rows),
	join(',', map { sprintf('[{"me": "%s", "port": %d}]', $_, $peer{$_}->port) } @names),
	'each row carries the result of the node it names');

# ---------------------------------------------------------------------------------------
# Fan-out: three nodes in parallel take about as long as one (not three times as long).

my $sleep_sql = q{'SELECT pg_sleep(0.3) AS slept'};
pq("$sleep_sql, $all");    # warm-up: every pool has a ready connection
my (@single, @fanout);
for my $try (1 .. 3)
{
	my ($t1, @r1) = pq("$sleep_sql, ARRAY['$p1']");
	is(join(',', map { $_->{ok} } @r1), 't', "single-node call $try succeeded");
	push @single, $t1;
	my ($t3, @r3) = pq("$sleep_sql, $all");
	is(join(',', map { $_->{ok} } @r3), 't,t,t', "fan-out call $try succeeded on all three");
	push @fanout, $t3;
	note sprintf('try %d: one node %.1f ms, three nodes %.1f ms (per node: %s)',
		$try, 1000 * $t1, 1000 * $t3, join(', ', map { "$_->{name} $_->{ms} ms" } @r3));
}
my ($best1) = sort { $a <=> $b } @single;
my ($best3) = sort { $a <=> $b } @fanout;
note sprintf('fan-out over 3 nodes: best %.1f ms vs one node best %.1f ms: ratio %.2f',
	1000 * $best3, 1000 * $best1, $best3 / $best1);
cmp_ok($best3, '<', 2 * $best1, 'fan-out over three nodes takes less than 2 x a single-node call');
cmp_ok($best3, '<', 0.3 * 3, 'fan-out is not the sum of the three sleeps');

# ---------------------------------------------------------------------------------------
# jsonb typing is the same on every node: numbers, booleans, null, json embedded, text.

is( $coord->safe_psql('postgres', qq{
SELECT string_agg(node_name || ':' || jsonb_typeof(result -> 0 -> 'i') || ',' || jsonb_typeof(result -> 0 -> 'n')
       || ',' || jsonb_typeof(result -> 0 -> 'b') || ',' || jsonb_typeof(result -> 0 -> 'z')
       || ',' || jsonb_typeof(result -> 0 -> 'jb') || ',' || jsonb_typeof(result -> 0 -> 'js')
       || ',' || jsonb_typeof(result -> 0 -> 's') || ',' || jsonb_typeof(result -> 0 -> 'd'), ' ')
  FROM peerpool.parallel_query(\$\$SELECT 7 AS i, 2.50::numeric AS n, false AS b, NULL::int AS z,
        '{"k": [1, true]}'::jsonb AS jb, '[1, "x"]'::json AS js, 'plain' AS s, date '2026-01-02' AS d\$\$, $all)}),
	join(' ', map { "$_:number,number,boolean,null,object,array,string,string" } @names),
	'jsonb types: numbers, booleans, null, json/jsonb embedded, text and dates as strings, on every node');
is( $coord->safe_psql('postgres', qq{
SELECT count(DISTINCT result) || ',' || min(result::text)
  FROM peerpool.parallel_query(\$\$SELECT 7 AS i, 2.50::numeric AS n, false AS b, NULL::int AS z,
        '{"k": [1, true]}'::jsonb AS jb\$\$, $all)}),
	'1,[{"b": false, "i": 7, "n": 2.50, "z": null, "jb": {"k": [1, true]}}]',
	'the three nodes return the same jsonb value');
is( $coord->safe_psql('postgres', qq{
SELECT string_agg(node_name || ':' || jsonb_array_length(result), ',')
  FROM peerpool.parallel_query('SELECT g FROM generate_series(1, 500) g', $all)}),
	join(',', map { "$_:500" } @names), 'several rows: one object per row from every node');

# ---------------------------------------------------------------------------------------
# A per-node deadline: the slow node fails with 57014 and its remote query is cancelled;
# the others answer. Without timeout_ms, peerpool.query_timeout (USERSET) applies.

my $slow_p3 = q{$$SELECT pg_sleep(CASE current_setting('cluster_name') WHEN '} . $p3
  . q{' THEN 30 ELSE 0.1 END) AS s$$};
# A session on p3 watches (inside the server, every millisecond) its remote query appear
# and go away. The cancel is late by at most gone - (call start + timeout): the call starts
# before the worker's deadline clock does.
my $w3 = $peer{$p3}->background_psql('postgres');
my $remote_running = "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool'"
  . " AND state = 'active' AND query LIKE '%pg_sleep(CASE%'";

PeerpoolFleet::stat_lifetime_start($w3, $remote_running, 20);
my $t_call = time;
($secs, @rows) = pq("$slow_p3, $all, timeout_ms => 500");
my ($appeared, $gone) = PeerpoolFleet::stat_lifetime_finish($w3);
note sprintf('timeout_ms => 500 with %s sleeping 30 s: call took %.1f ms: %s', $p3, 1000 * $secs, describe(@rows));
is(join(',', map { "$_->{name}:$_->{ok}" } @rows), "$p1:t,$p2:t,$p3:f", "$p3 timed out, the others answered");
is($rows[2]{error}, qq{timeout: node "$p3" did not answer within 500 ms [SQLSTATE 57014]}, 'timeout error text with 57014');
cmp_ok($rows[2]{ms}, '>=', 450, "$p3 elapsed_ms is at least about the timeout");
cmp_ok($rows[2]{ms}, '<', 1500, "$p3 elapsed_ms is bounded by the timeout");
cmp_ok($secs, '<', 2, 'the call returns soon after the deadline');
ok(defined $appeared && defined $gone, "$p3: the remote query ran and went away");
note sprintf('%s: remote query seen %.1f ms after the call started, gone %.1f ms after it started'
	  . ' (%.1f ms after the 500 ms deadline)', $p3, 1000 * (($appeared // 0) - $t_call),
	1000 * (($gone // 0) - $t_call), 1000 * (($gone // 0) - $t_call - 0.5));
cmp_ok(($gone // 9**9**9) - ($t_call + 0.5), '<', 1,
	"$p3: the timed-out remote query is cancelled within 1 s of the deadline");

PeerpoolFleet::stat_lifetime_start($w3, $remote_running, 20);
$t_call = time;
($secs, @rows) = pq("$slow_p3, ARRAY['$p3', '$p1']", "SET peerpool.query_timeout = '400ms';\n");
($appeared, $gone) = PeerpoolFleet::stat_lifetime_finish($w3);
$bs->query_safe('RESET peerpool.query_timeout');
note sprintf('peerpool.query_timeout = 400ms: call took %.1f ms: %s', 1000 * $secs, describe(@rows));
is(join(',', map { "$_->{name}:$_->{ok}" } @rows), "$p3:f,$p1:t", 'query_timeout applies without timeout_ms');
is($rows[0]{error}, qq{timeout: node "$p3" did not answer within 400 ms [SQLSTATE 57014]},
	'the timeout error names the query_timeout value');
note sprintf('%s: remote query gone %.1f ms after the 400 ms deadline', $p3,
	1000 * (($gone // 0) - $t_call - 0.4));
cmp_ok(($gone // 9**9**9) - ($t_call + 0.4), '<', 1,
	"$p3: the remote query is cancelled within 1 s of the query_timeout deadline");
$w3->quit;

# ---------------------------------------------------------------------------------------
# A peer stopped in immediate mode fails fast -- at once, and once the worker marked it --
# while the others run their full query.

ok(wait_healthy(\@names), 'all peers healthy before the stop');
my $long = q{'SELECT pg_sleep(1) AS slept'};
$peer{$p1}->stop('immediate');
($secs, @rows) = pq("$long, $all");
note sprintf('right after stopping %s: call took %.1f ms: %s', $p1, 1000 * $secs, describe(@rows));
is(join(',', map { "$_->{name}:$_->{ok}" } @rows), "$p1:f,$p2:t,$p3:t",
	"right after the stop: $p1 fails, the others succeed");
cmp_ok($rows[0]{ms}, '<', 500, "$p1 failed well under the 1 s query time (right after the stop)");
cmp_ok($rows[1]{ms}, '>=', 1000, "$p2 ran its full query");

my $down = PeerpoolFleet::wait_for_health($coord,
	"count(*) FILTER (WHERE node_name = '$p1' AND state IN ('unhealthy', 'reconnecting')) = 1", 10);
ok(defined $down, "$p1 is unhealthy or reconnecting");
($secs, @rows) = pq("$long, $all");
note sprintf('%s marked down: call took %.1f ms: %s', $p1, 1000 * $secs, describe(@rows));
is(join(',', map { "$_->{name}:$_->{ok}" } @rows), "$p1:f,$p2:t,$p3:t",
	"$p1 marked down: it fails, the others succeed");
like($rows[0]{error}, qr/^node "$p1" is (unhealthy|reconnecting)/, "$p1: the error names the node's state");
cmp_ok($rows[0]{ms}, '<', 100, "$p1 failed at once (marked down)");
cmp_ok($secs, '<', 1.9, 'the call took about the query time of the live nodes');

$peer{$p1}->start;
PeerpoolFleet::timed_ok(wait_healthy([$p1], timeout => 15), 10, "$p1 healthy again after restart");

# A disabled node named explicitly fails at once; NULL leaves it out.
$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('$p2', enabled => false)");
ok( PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name = '$p2' AND state = 'disconnected') = 1", 10),
	"$p2 disabled");
($secs, @rows) = pq("'SELECT 1 AS one', $all");
is(join(',', map { "$_->{name}:$_->{ok}" } @rows), "$p1:t,$p2:f,$p3:t", 'a disabled node named explicitly fails');
like($rows[1]{error}, qr/^node "$p2" is disabled/, 'the error says it is disabled');
($secs, @rows) = pq("'SELECT 1 AS one'");
is(join(',', map { $_->{name} } @rows), "$p1,$p3", 'NULL nodes leaves the disabled node out');
$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('$p2', enabled => true)");
ok(wait_healthy(\@names, timeout => 15), 'all peers healthy again');

# ---------------------------------------------------------------------------------------
# A frozen peer (SIGSTOP: sockets open, nothing answers) still counts as healthy at first;
# its row fails at the 1 s deadline while the others return, and the call takes ~1 s.

my $t_freeze = time;
@frozen = PeerpoolFleet::freeze($peer{$p2});
note "froze $p2: pids @frozen";
($secs, @rows) = pq(q{'SELECT pg_sleep(0.3) AS slept', NULL, timeout_ms => 1000});
note sprintf('%s frozen (%.1f ms before the call returned): call took %.1f ms: %s',
	$p2, 1000 * (time - $t_freeze), 1000 * $secs, describe(@rows));
note "$p2 state during the call: "
  . $coord->safe_psql('postgres', "SELECT state FROM peerpool.node_health WHERE node_name = '$p2'");
is(join(',', map { "$_->{name}:$_->{ok}" } @rows), "$p1:t,$p2:f,$p3:t",
	"frozen $p2 fails, the others succeed");
like($rows[1]{error}, qr/^timeout: node "$p2" did not answer within 1000 ms \[SQLSTATE 57014\]$/,
	"$p2: timeout error");
cmp_ok($rows[1]{ms}, '>=', 950, "$p2 failed at about the deadline, not before");
cmp_ok($rows[1]{ms}, '<', 1500, "$p2 failed at about the deadline, not much after");
cmp_ok($rows[0]{ms}, '<', 1000, "$p1 was not held up by the frozen node");
cmp_ok($secs, '<', 2, 'the whole call took about the timeout (< 2 s)');

my $t_thaw = time;
PeerpoolFleet::thaw(@frozen);
@frozen = ();
my $back = PeerpoolFleet::wait_until($coord,
	"SELECT count(*) = 3 AND bool_and(success) FROM peerpool.parallel_query('SELECT 1', $all)",
	timeout => 20, start => $t_thaw);
PeerpoolFleet::timed_ok($back, 15, "after SIGCONT all three answer again");
note "$p2 events since the freeze: "
  . join(', ', PeerpoolFleet::transitions(PeerpoolFleet::events($coord, $p2, since => $t_freeze)));

# ---------------------------------------------------------------------------------------
# Errors of the call itself: unknown names are refused with 42704; remote errors are rows.

my ($ret, $err) = PeerpoolFleet::psql_error($coord,
	"SELECT * FROM peerpool.parallel_query('SELECT 1', ARRAY['$p1', 'nope']);");
isnt($ret, 0, 'an unknown node name fails the call');
like($err, qr/ERROR:\s+42704: node "nope" does not exist/, 'unknown node: 42704 naming it');
note "unknown node said:\n$err";

($secs, @rows) = pq(q{'SELECT 1/0', } . $all);
is( join(',', map { "$_->{ok}:$_->{error}" } @rows),
	join(',', ('f:division by zero [SQLSTATE 22012]') x 3),
	'a remote error is a failed row with its SQLSTATE on every node');

# ---------------------------------------------------------------------------------------

$bs->quit;
PeerpoolFleet::check_logs($coord, @peers);
$_->stop for ($coord, @peers);

done_testing();
