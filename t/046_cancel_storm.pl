# Copyright (c) pg_peerpool contributors

# Cancel storm (issue 11 item 2): waves of sessions whose pool_query('SELECT pg_sleep(10)')
# is cancelled by statement_timeout (300 ms), all at once, while a stream of quick calls
# runs beside them. Each wave's remote queries are gone within 1 s of the deadline, the
# quick calls are never cancelled by mistake, and the pools end consistent.
# PEERPOOL_STORM_SESSIONS (default 50) and PEERPOOL_STORM_WAVES (default 5).

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $sessions = $ENV{PEERPOOL_STORM_SESSIONS} // 50;
my $waves = $ENV{PEERPOOL_STORM_WAVES} // 5;
my $stmt_timeout_ms = 300;

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
max_connections = 100
peerpool.health_check_interval = '1s'
EOC
my @peers = PeerpoolFleet::peers(2, conf => 'max_connections = 40');
my @names = map { $_->name } @peers;
PeerpoolFleet::register($coord, { sql_extra => 'min_connections => 2, max_connections => 10' }, @peers);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 10),
	10, 'both peers healthy');

# The barrier: wave w's clients wait for the shared advisory lock 1000 + w, held here.
my $barrier = $coord->background_psql('postgres');
$barrier->query_safe(join('; ', map { 'SELECT pg_advisory_lock(' . (1000 + $_) . ')' } 1 .. $waves));

my @clients;
for my $i (1 .. $sessions)
{
	my $node = $names[ $i % 2 ];
	my @cmds;
	for my $w (1 .. $waves)
	{
		push @cmds, 'RESET statement_timeout', 'SELECT pg_advisory_lock_shared(' . (1000 + $w) . ')',
		  "SET statement_timeout = '${stmt_timeout_ms}ms'",
		  "SELECT * FROM peerpool.pool_query('SELECT pg_sleep(10) /* fp_storm $w */', '$node') AS t(s text)",
		  'RESET statement_timeout', 'SELECT pg_advisory_unlock_shared(' . (1000 + $w) . ')';
	}
	push @clients, PeerpoolFleet::psql_start($coord, \@cmds, application_name => "fp_storm_$i",
		timeout => 60 + 10 * $waves);
}

# The quick stream: parallel_query('SELECT 1') over both peers in a loop, no deadline of
# its own; it counts failures and their first error.
my $stream = PeerpoolFleet::psql_start($coord, [
	qq{CREATE FUNCTION pg_temp.quick_loop(secs float8, OUT calls int, OUT failed int, OUT first_error text, OUT max_ms float8)
LANGUAGE plpgsql AS \$\$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => secs);
    t timestamptz;
    r record;
BEGIN
    calls := 0; failed := 0; max_ms := 0;
    WHILE clock_timestamp() < deadline LOOP
        t := clock_timestamp();
        FOR r IN SELECT * FROM peerpool.parallel_query('SELECT 1 /* fp_quick */', ARRAY['$names[0]', '$names[1]']) LOOP
            IF NOT r.success THEN
                failed := failed + 1;
                first_error := coalesce(first_error, r.node_name || ': ' || r.error);
            END IF;
        END LOOP;
        calls := calls + 1;
        max_ms := greatest(max_ms, extract(epoch FROM clock_timestamp() - t) * 1000);
        PERFORM pg_sleep(0.01);
    END LOOP;
END \$\$},
	'SELECT calls, failed, coalesce(first_error, \'\'), round(max_ms::numeric, 1) FROM pg_temp.quick_loop(' . (15 + 6 * $waves) . ')' ],
	application_name => 'fp_quick', timeout => 120 + 10 * $waves);

my @gone;
my @watch = map { $_->background_psql('postgres') } @peers;
for my $w (1 .. $waves)
{
	my $lock = 1000 + $w;
	ok( PeerpoolFleet::wait_until($coord,
			"SELECT count(*) = $sessions FROM pg_locks WHERE locktype = 'advisory' AND objid = $lock AND NOT granted",
			timeout => 60),
		"wave $w: $sessions sessions at the barrier");
	# Watch each peer inside the server (every millisecond, fresh statistics) for this
	# wave's remote queries to appear and go away.
	for my $i (0 .. $#peers)
	{
		PeerpoolFleet::stat_lifetime_start($watch[$i],
			"SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'pg_peerpool'"
			  . " AND query LIKE '%fp_storm $w %' AND state = 'active'", 30);
	}
	my $t0 = time;
	$barrier->query_safe("SELECT pg_advisory_unlock($lock)");
	# Every session's deadline is 300 ms after it starts; all have started once the lock
	# is free. The remote queries must be gone 1 s after the deadline.
	my ($appeared_all, $gone_all) = (1, 0);
	my @desc;
	for my $i (0 .. $#peers)
	{
		my ($appeared, $gone) = PeerpoolFleet::stat_lifetime_finish($watch[$i]);
		$appeared_all = 0 unless defined $appeared;
		$gone_all = defined $gone && $gone_all ne 'never' ? ($gone - $t0 > $gone_all ? $gone - $t0 : $gone_all) : 'never';
		push @desc, sprintf('%s: seen %s ms, gone %s ms', $names[$i],
			defined $appeared ? sprintf('%.1f', 1000 * ($appeared - $t0)) : 'never',
			defined $gone ? sprintf('%.1f', 1000 * ($gone - $t0)) : 'never');
	}
	my $all_gone = $gone_all eq 'never' ? undef : $gone_all;
	push @gone, $all_gone // 99;
	note sprintf('wave %d: after the barrier opened: %s', $w, join('; ', @desc));
	my $max_seen = $appeared_all;
	ok($max_seen, "wave $w: remote queries ran on both peers");
	# Measured from the barrier, not from each session's own statement start (a few
	# round trips later on a busy machine): 0.5 s of slack for that skew.
	cmp_ok($all_gone // 99, '<', $stmt_timeout_ms / 1000 + 1 + 0.5,
		"wave $w: every remote query gone within 1 s of the 300 ms deadline (+0.5 s for the sessions' start skew)");
}

my %outcome;
for my $h (@clients)
{
	my ($ret, $out, $err) = PeerpoolFleet::psql_finish($h);
	$outcome{$_}++ for ($err =~ /ERROR:\s+(\w{5}):/g);
	$outcome{'exit ' . $ret}++ if $ret != 0 && $ret != 1;
}
note 'storm sessions: errors by SQLSTATE: ' . join(', ', map { "$_ x $outcome{$_}" } sort keys %outcome);
is($outcome{57014} // 0, $sessions * $waves, 'every storm call ended with 57014 (statement timeout)');
is(join(',', grep { $_ ne '57014' } sort keys %outcome), '', 'and nothing else');

my ($ret, $out, $err) = PeerpoolFleet::psql_finish($stream);
chomp $out;
my ($calls, $failed, $first, $max_ms) = split /\|/, $out;
note sprintf('quick stream: %s calls, %s failed (%s), slowest %s ms', $calls // '?', $failed // '?', $first // '', $max_ms // '?');
is($ret, 0, 'the quick stream ran') or diag $err;
cmp_ok($calls // 0, '>', 10, 'the quick stream made calls throughout');
is($failed, 0, 'no quick call was cancelled or failed');

ok( PeerpoolFleet::wait_until($coord,
		q{SELECT bool_and(total <= 10 AND active = 0 AND waiting = 0 AND total = active + idle) FROM peerpool.pool_stats},
		timeout => 10),
	'pool_stats consistent afterwards');
for my $p (@peers)
{
	ok( PeerpoolFleet::wait_until($p,
			q{SELECT count(*) <= 10 AND count(*) FILTER (WHERE state LIKE 'idle in transaction%') = 0
			  FROM pg_stat_activity WHERE application_name = 'pg_peerpool'}, timeout => 10),
		$p->name . ': sessions of ours within max, none idle in transaction');
}
my $ok = PeerpoolFleet::wait_until($coord,
	"SELECT bool_and(success) FROM peerpool.parallel_query('SELECT 1', ARRAY['$names[0]', '$names[1]'])", timeout => 10);
ok(defined $ok, 'calls succeed afterwards');

note sprintf('remote queries all gone after: %s ms', join(', ', map { sprintf('%.1f', 1000 * $_) } @gone));
$_->quit for (@watch, $barrier);
PeerpoolFleet::check_logs($coord, @peers);
$_->stop for ($coord, @peers);

done_testing();
