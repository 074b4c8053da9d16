# Copyright (c) pg_peerpool contributors

# pool_query() under stress (SPEC sections 5 and 7): cancelling the caller -- statement_timeout,
# pg_cancel_backend, pg_terminate_backend -- cancels the remote query within 1 s and leaves a
# working pool; a connection left in a transaction never reaches the next caller and
# peerpool.reset_query runs on every return; 20 callers against a pool of 2 queue FIFO,
# never open more than 2 remote sessions, and either succeed or fail with 53300 after
# peerpool.acquire_timeout, as pool_stats counts; a 50 MB result streams through the pool
# manager without its memory growing with the result.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
peerpool.health_check_timeout = '2s'
peerpool.degraded_latency = '2s'
EOC
# peer1: a pool of at most 2 (queueing, cancels); solo: a pool of exactly 1, so that the
# next call surely gets the connection the previous one returned (hygiene, large result).
my ($peer1, $solo) = (PeerpoolFleet::peers(1), PeerpoolFleet::peers(1, prefix => 'solo'));
my ($p1, $s1) = ($peer1->name, $solo->name);
my $max = 2;
PeerpoolFleet::register($coord, { sql_extra => "min_connections => 1, max_connections => $max" }, $peer1);
PeerpoolFleet::register($coord, { sql_extra => 'min_connections => 1, max_connections => 1' }, $solo);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 10),
	5, 'both peers healthy');

# A session on peer1 that watches its pg_stat_activity from inside the server.
my $w1 = $peer1->background_psql('postgres');

sub stat_of
{
	my ($name, $cols) = @_;
	return $coord->safe_psql('postgres',
		"SELECT concat_ws(',', $cols) FROM peerpool.pool_stats WHERE node_name = '$name'");
}

# Our pooled sessions on a peer. A cancel opens no session (it is a CancelRequest that the
# peer's postmaster answers), so every one counts.
my $ours = "application_name = 'pg_peerpool'";

# ---------------------------------------------------------------------------------------
# Cancelling the caller cancels the remote query within 1 s, three ways.

my $remote_sleep = "application_name = 'pg_peerpool' AND state = 'active' AND query = 'SELECT pg_sleep(30)'";
my $long_call = "SELECT * FROM peerpool.pool_query('SELECT pg_sleep(30)', '$p1') AS t(a text)";
my %caller_error = (
	statement_timeout => qr/ERROR:\s+57014: canceling statement due to statement timeout/,
	cancel            => qr/ERROR:\s+57014: canceling statement due to user request/,
	terminate         => qr/FATAL:\s+57P01: terminating connection due to administrator command|server closed the connection unexpectedly/);

for my $how ('statement_timeout', 'cancel', 'terminate')
{
	my $app = "caller_$how";
	my @commands = ($long_call);
	# The caller prints the time just before its long statement starts (the next -c).
	unshift @commands, "SET statement_timeout = '500ms'", 'SELECT extract(epoch FROM clock_timestamp())'
	  if $how eq 'statement_timeout';
	my @pids_before = PeerpoolFleet::remote_pids($peer1);

	PeerpoolFleet::stat_watch_start($w1, "SELECT count(*) = 1 FROM pg_stat_activity WHERE $remote_sleep", 10);
	my $caller = PeerpoolFleet::psql_start($coord, \@commands, application_name => $app);
	my $started = PeerpoolFleet::watch_finish($w1);
	ok(defined $started, "$how: the remote pg_sleep(30) runs on $p1");
	note sprintf('%s: remote query seen %.1f ms after psql was started', $how,
		1000 * (($started // 0) - $caller->{started}));

	# When the caller is cancelled: at statement start + statement_timeout, or when we ask.
	my $cancel_at;
	PeerpoolFleet::stat_watch_start($w1, "SELECT count(*) = 0 FROM pg_stat_activity WHERE $remote_sleep", 10);
	if ($how ne 'statement_timeout')
	{
		my $fn = $how eq 'cancel' ? 'pg_cancel_backend' : 'pg_terminate_backend';
		# The server's clock just before it signals the caller.
		my ($at, $signalled) = split /\|/, $coord->safe_psql('postgres',
			"SELECT extract(epoch FROM clock_timestamp()), $fn(pid) FROM pg_stat_activity WHERE application_name = '$app'");
		is($signalled // '', 't', "$how: $fn() on the caller's backend");
		$cancel_at = $at // time;
	}
	my $gone = PeerpoolFleet::watch_finish($w1);
	ok(defined $gone, "$how: the remote query went away");
	my ($ret, $out, $err) = PeerpoolFleet::psql_finish($caller);
	if ($how eq 'statement_timeout')
	{
		# No later than the actual timeout: the statement started after this was printed.
		my ($printed) = $out =~ /^([\d.]+)$/m;
		ok(defined $printed, 'statement_timeout: the caller printed its start time');
		$cancel_at = ($printed // 0) + 0.5;
	}
	note sprintf('%s: remote query gone %.1f ms after the cancel; caller returned after %.1f ms (exit %d)',
		$how, 1000 * (($gone // 9**9**9) - $cancel_at), 1000 * ($caller->{finished} - $cancel_at), $ret);
	cmp_ok(($gone // 9**9**9) - $cancel_at, '<', 1, "$how: the remote query is cancelled within 1 s");
	isnt($ret, 0, "$how: the caller's statement failed");
	like($err, $caller_error{$how}, "$how: the caller got the expected error");
	note "$how: caller said: $err";

	# The pool works afterwards and stays within max_connections.
	is( $coord->safe_psql('postgres',
			"SELECT * FROM peerpool.pool_query('SELECT ''works''', '$p1') AS t(a text)"),
		'works', "$how: a new pool_query on $p1 works");
	my $stats = stat_of($p1, 'total, active, idle, errors');
	my ($total) = split /,/, $stats;
	cmp_ok($total, '<=', $max, "$how: pool_stats total <= max_connections ($max)");
	my $sessions = $peer1->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE $ours");
	cmp_ok($sessions, '<=', $max, "$how: at most $max pooled sessions on $p1");
	note sprintf('%s: pool_stats total,active,idle,errors = %s; remote sessions %s -> %s', $how, $stats,
		join(' ', @pids_before), join(' ', PeerpoolFleet::remote_pids($peer1)));
}

# ---------------------------------------------------------------------------------------
# Hygiene: a remote transaction left open is rolled back before the connection is reused.

my $solo_pid = $coord->safe_psql('postgres',
	"SELECT * FROM peerpool.pool_query('SELECT pg_backend_pid()', '$s1') AS t(p int)");
my $ws = $solo->background_psql('postgres');
is( $coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.pool_query('BEGIN', '$s1') AS t(a text)"),
	'0', 'BEGIN through pool_query returns no rows');
my $returned = time;
PeerpoolFleet::stat_watch_start($ws,
	"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool' AND state LIKE 'idle in transaction%'",
	5);
my $clean = PeerpoolFleet::watch_finish($ws);
ok(defined $clean, 'the connection left in a transaction is rolled back on the peer');
note sprintf('no session of ours idle in transaction on %s %.1f ms after the BEGIN call returned',
	$s1, 1000 * (($clean // 0) - $returned));
cmp_ok(($clean // 9**9**9) - $returned, '<', 1, 'rolled back within 1 s of the return');
$ws->quit;
is( $coord->safe_psql('postgres',
		"SELECT * FROM peerpool.pool_query('SELECT now() = statement_timestamp() AND pg_current_xact_id_if_assigned() IS NULL', '$s1') AS t(fresh boolean)"),
	't', 'the next caller runs in a fresh transaction');

# A transaction with an xid and a temp table, left open: nothing of it is seen next.
my $xid = $coord->safe_psql('postgres',
	"SELECT * FROM peerpool.pool_query('BEGIN; CREATE TEMP TABLE leftover (i int); SELECT pg_current_xact_id()::text', '$s1') AS t(x text)");
like($xid, qr/^\d+$/, "an open transaction with xid $xid");
is( $coord->safe_psql('postgres',
		"SELECT * FROM peerpool.pool_query('SELECT pg_current_xact_id_if_assigned() IS NULL AND to_regclass(''pg_temp.leftover'') IS NULL', '$s1') AS t(fresh boolean)"),
	't', 'the next caller sees no xid and no temp table of the previous one');
is( $solo->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_xid = '$xid'::xid"),
	'0', "xid $xid is no longer running on the peer");
note sprintf('solo remote pid before %s, after %s', $solo_pid,
	$coord->safe_psql('postgres', "SELECT * FROM peerpool.pool_query('SELECT pg_backend_pid()', '$s1') AS t(p int)"));

# ---------------------------------------------------------------------------------------
# 20 callers, one pool of 2: FIFO queue with acquire_timeout; never more than 2 sessions.

my $callers = 20;
my $acquire_ms = 1500;
$coord->safe_psql('postgres', 'SELECT peerpool.pool_reset_stats()');
# All callers wait on an advisory lock we hold, so that they call at the same moment.
my $gate = $coord->background_psql('postgres');
$gate->query_safe('SELECT pg_advisory_lock(4242)');
my @clients = map {
	PeerpoolFleet::psql_start(
		$coord,
		[
			"SET peerpool.acquire_timeout = '${acquire_ms}ms'",
			'SELECT pg_advisory_lock_shared(4242)',
			"SELECT * FROM peerpool.pool_query('SELECT pg_sleep(0.2)', '$p1') AS t(a text)"
		],
		application_name => "queue_$_")
} 1 .. $callers;
ok( PeerpoolFleet::wait_until($coord,
		"SELECT count(*) = $callers FROM pg_locks WHERE locktype = 'advisory' AND NOT granted", timeout => 30),
	"$callers callers wait at the gate");
my $sample_secs = 3;
PeerpoolFleet::stat_sample_start($w1, "SELECT count(*) FROM pg_stat_activity WHERE $ours", $sample_secs);
my $t_open = time;
$gate->query_safe('SELECT pg_advisory_unlock(4242)');
my ($tcp_max, $tcp_samples) = (0, 0);
my $deadline = time + 30;
while (grep { PeerpoolFleet::psql_running($_) } @clients)
{
	my $n = PeerpoolFleet::tcp_clients_to($peer1->port);
	$tcp_max = $n if $n > $tcp_max;
	$tcp_samples++;
	last if time > $deadline;
	Time::HiRes::usleep(2_000);
}
my $t_done = time;
my ($ok, $busy, @other) = (0, 0);
for my $i (0 .. $#clients)
{
	my ($ret, $out, $err) = PeerpoolFleet::psql_finish($clients[$i]);
	if ($ret == 0 && $err eq '')
	{
		$ok++;
	}
	elsif ($err =~ /ERROR:\s+53300: timeout waiting for a connection of node "$p1"/)
	{
		$busy++;
	}
	else
	{
		push @other, "caller $i: exit $ret: $err";
	}
}
my ($remote_max, $remote_samples) = PeerpoolFleet::stat_sample_finish($w1);
note sprintf('%d callers, pool of %d, acquire_timeout %d ms, 0.2 s each: %d succeeded, %d failed with 53300 in %.1f ms',
	$callers, $max, $acquire_ms, $ok, $busy, 1000 * ($t_done - $t_open));
note sprintf('peak pooled sessions on %s: %d (%d samples in pg_stat_activity); peak TCP connections to it: %d (%d samples)',
	$p1, $remote_max, $remote_samples, $tcp_max, $tcp_samples);
is(join("\n", @other), '', 'every caller either succeeded or failed with 53300');
is($ok + $busy, $callers, 'all callers accounted for');
cmp_ok($ok, '>=', 2 * 3, 'the pool served callers back to back while the others waited (>= 3 rounds of 2)');
cmp_ok($busy, '>=', 1, 'callers beyond what the pool can serve in acquire_timeout failed with 53300');
cmp_ok($remote_samples, '>', 100, 'pg_stat_activity was sampled while the callers ran');
cmp_ok($remote_max, '<=', $max, "never more than $max pooled sessions on $p1 (pg_stat_activity)");
cmp_ok($tcp_max, '<=', $max, "never more than $max TCP connections to $p1");
my $stats = stat_of($p1, 'acquire_timeouts, acquires, total, waiting');
note "pool_stats acquire_timeouts, acquires, total, waiting: $stats";
my ($timeouts, $acquires, $total, $waiting) = split /,/, $stats;
is($timeouts, $busy, 'pool_stats acquire_timeouts equals the number of 53300 failures');
cmp_ok($total, '<=', $max, 'pool_stats total <= max_connections');
is($waiting, 0, 'nobody waits any more');
$gate->quit;

# FIFO: callers queued behind a busy connection are served in the order they came. The
# holder's remote query waits for an advisory lock we hold on the peer, so it stays busy
# until every caller is queued.
my $lock = $solo->background_psql('postgres');
$lock->query_safe('SELECT pg_advisory_lock(99)');
my $holder = PeerpoolFleet::psql_start($coord,
	["SELECT * FROM peerpool.pool_query('SELECT pg_advisory_xact_lock_shared(99)', '$s1') AS t(a text)"]);
ok( PeerpoolFleet::wait_until($coord,
		"SELECT active = 1 FROM peerpool.pool_stats WHERE node_name = '$s1'", timeout => 10),
	"$s1: its only connection is busy");
my @fifo;
for my $k (1 .. 4)
{
	push @fifo,
	  PeerpoolFleet::psql_start($coord,
		["SELECT * FROM peerpool.pool_query('SELECT extract(epoch FROM clock_timestamp())', '$s1') AS t(at numeric)"]);
	ok( PeerpoolFleet::wait_until($coord,
			"SELECT waiting = $k FROM peerpool.pool_stats WHERE node_name = '$s1'", timeout => 10),
		"$s1: caller $k queued");
}
$lock->query_safe('SELECT pg_advisory_unlock(99)');
my ($hret) = PeerpoolFleet::psql_finish($holder);
is($hret, 0, 'the holder finished');
my @served = map { my ($r, $o, $e) = PeerpoolFleet::psql_finish($_); $r == 0 ? ($o =~ s/\s+\z//r) : "failed: $e" } @fifo;
note "queued callers ran their remote query at: @served";
is(scalar(grep { /^[\d.]+$/ } @served), 4, 'every queued caller was served');
is_deeply([ sort { $a <=> $b } grep { /^[\d.]+$/ } @served ], [ grep { /^[\d.]+$/ } @served ],
	'queued callers were served in arrival order (FIFO)');
$lock->quit;

# ---------------------------------------------------------------------------------------
# A large result (100k rows, ~50 MB) streams through the pool manager: its memory stays flat.

my ($worker) = PeerpoolFleet::worker_pids($coord);
my $mem0 = PeerpoolFleet::proc_memory_kb($worker);
my $t_big = time;
my $big = $coord->safe_psql('postgres', qq{SELECT count(*), sum(length(s)), count(DISTINCT g)
  FROM peerpool.pool_query('SELECT g, repeat(''x'', 500) FROM generate_series(1, 100000) g', '$s1') AS t(g int, s text)});
my $big_secs = time - $t_big;
my $mem1 = PeerpoolFleet::proc_memory_kb($worker);
is($big, '100000|50000000|100000', '100k rows, 50 MB of text, every row once');
note sprintf('large result: %.1f ms; pool manager (pid %d) VmRSS %d -> %d kB (%+d kB), VmHWM %d -> %d kB (%+d kB)',
	1000 * $big_secs, $worker, $mem0->{rss}, $mem1->{rss}, $mem1->{rss} - $mem0->{rss},
	$mem0->{hwm}, $mem1->{hwm}, $mem1->{hwm} - $mem0->{hwm});
cmp_ok($mem1->{hwm} - $mem0->{hwm}, '<', 20 * 1024, 'pool manager peak RSS grew by less than 20 MB');
cmp_ok($mem1->{rss} - $mem0->{rss}, '<', 20 * 1024, 'pool manager RSS grew by less than 20 MB');
is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, 'the same pool manager is still running');
is( $coord->safe_psql('postgres', "SELECT * FROM peerpool.pool_query('SELECT 1', '$s1') AS t(a int)"),
	'1', 'the connection is reusable after the large result');

# ---------------------------------------------------------------------------------------
# reset_query runs once on every return: a statement that advances a sequence on the peer.
# Calls here wait at most 1 s for a connection, so that a pool that never gets its
# connection back fails these checks instead of hanging the test.

# One pool_query call on solo; returns (psql exit code, stdout, stderr).
sub solo_call
{
	my ($sql, $type) = @_;
	my ($out, $err) = ('', '');
	my $ret = $coord->psql('postgres',
		"\\set VERBOSITY verbose\nSET peerpool.acquire_timeout = '1s';\n"
		  . sprintf('SELECT * FROM peerpool.pool_query(%s, %s) AS t(v %s)',
			PeerpoolFleet::quote($sql), PeerpoolFleet::quote($s1), $type),
		stdout => \$out, stderr => \$err);
	return ($ret, $out, $err);
}

$solo->safe_psql('postgres', 'CREATE SEQUENCE reset_seq');
my $seq = sub {
	$solo->safe_psql('postgres', 'SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM reset_seq');
};
my @base = map { (solo_call('SELECT 1', 'int'))[1] } 1 .. 3;
is("@base", '1 1 1', 'three calls without reset_query');
is($seq->(), '0', 'without reset_query nothing runs on return');
PeerpoolFleet::set_gucs($coord, 'peerpool.reset_query' => "SELECT nextval('reset_seq')");
my $applied = PeerpoolFleet::wait_until($coord,
	"SET peerpool.acquire_timeout = '1s';\n"
	  . "SELECT * FROM peerpool.pool_query('SELECT is_called FROM reset_seq', '$s1') AS t(c boolean)",
	timeout => 5);
PeerpoolFleet::timed_ok($applied, 5, 'reset_query applied after reload (it ran after a call)');
# Read the counter through the pool: with one connection, this call runs after every
# earlier return's reset_query finished; its own return runs it once more.
my (undef, $before) = solo_call('SELECT last_value FROM reset_seq', 'bigint');
my @calls = map { [ solo_call('SELECT 1', 'int') ] } 1 .. 5;
is( join(' ', map { $_->[0] == 0 ? $_->[1] : "failed: $_->[2]" } @calls),
	'1 1 1 1 1', 'five calls with reset_query set succeed');
$before = 0 unless $before =~ /^\d+$/;
my $advanced = PeerpoolFleet::wait_until($solo,
	"SELECT last_value >= $before + 6 FROM reset_seq", timeout => 5);
PeerpoolFleet::timed_ok($advanced, 1, 'reset_query ran after each of the 6 calls');
my $after = $seq->();
# Read again (another psql round trip): nothing returned meanwhile, so nothing may have run.
my $later = $seq->();
note sprintf('reset_seq: %s read through the pool, %s after 5 more calls, %s a moment later',
	$before, $after, $later);
is($later - $before, 6, 'reset_query ran exactly once per return (6 returns, 6 runs, then no more)');

# DISCARD ALL as reset_query: session state left by one caller is gone for the next, also
# after a caller left a transaction open (a session advisory lock survives ROLLBACK).
PeerpoolFleet::set_gucs($coord, 'peerpool.reset_query' => 'DISCARD ALL');
my $log_offset = -s $coord->logfile;
# The LATERAL reference makes the SET call run before the SHOW call.
$applied = PeerpoolFleet::wait_until($coord,
	"SET peerpool.acquire_timeout = '1s';\n"
	  . "SELECT x.w <> '7MB' FROM (SELECT count(*) AS n FROM peerpool.pool_query('SET work_mem = ''7MB''', '$s1') AS t(a text)) s,"
	  . " LATERAL (SELECT w FROM peerpool.pool_query('SHOW work_mem' || CASE WHEN s.n >= 0 THEN '' END, '$s1') AS t(w text)) x",
	timeout => 5);
PeerpoolFleet::timed_ok($applied, 5, "reset_query = 'DISCARD ALL': a SET does not outlive its call");
my $closed_before = stat_of($s1, 'closed');
my ($ret, $out, $err) = solo_call('BEGIN; SELECT pg_advisory_lock(77)', 'text');
is($ret, 0, 'a call that leaves a transaction open and holds a session advisory lock');
($ret, $out, $err) = solo_call(
	q{SELECT count(*) = 0 AND now() = statement_timestamp() FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()},
	'boolean');
is("$ret:$out", '0:t', 'DISCARD ALL after an open transaction: the next caller holds no lock of the previous one');
note "next caller said: $err" if $ret;
is($solo->safe_psql('postgres', "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
	'0', 'the advisory lock is gone on the peer');
my $cleanup_log = PeerpoolFleet::log_since($coord, $log_offset);
note sprintf('open transaction + DISCARD ALL: pool_stats closed %s -> %s; cleanup failures logged: %d',
	$closed_before, stat_of($s1, 'closed'), scalar(() = $cleanup_log =~ /cleanup failed/g));
note "cleanup log: $1" if $cleanup_log =~ /(.*cleanup failed.*)/;

PeerpoolFleet::set_gucs($coord, 'peerpool.reset_query' => undef);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_until($coord,
		"SET peerpool.acquire_timeout = '1s';\nSELECT * FROM peerpool.pool_query('SELECT true', '$s1') AS t(ok boolean)",
		timeout => 10),
	5, 'reset_query reset: the pool serves again');
note 'reset_seq at the end: ' . $seq->();

# ---------------------------------------------------------------------------------------

$w1->quit;
PeerpoolFleet::check_logs($coord, $peer1, $solo);
$_->stop for ($coord, $peer1, $solo);

done_testing();
