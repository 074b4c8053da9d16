# Copyright (c) pg_peerpool contributors

# A real HA fleet (issue 11 item 4): pg_auto_failover (Debian package
# postgresql-15-auto-failover, which scripts/deps.sh installs) runs a monitor, a primary and
# a secondary, each managed by its own `pg_autoctl ... --run`. A coordinator registers both
# data nodes with role => 'auto' and a client loop inside the coordinator writes
# (pool_query(..., 'write')) and reads (pool_query(..., 'read')) continuously, recording every
# call's start, end, outcome and the answering server, while `pg_autoctl perform failover`
# swaps the roles. Asserted:
#  - the role change is seen as a role change: the promoted node passes through
#    `transitioning` (standby -> primary), and so does the old primary, which pg_auto_failover
#    stops while demoting it: it leaves `healthy`, comes back as a standby through
#    `transitioning` (primary -> standby), and the next check confirms it;
#  - writes reach the new primary within a measured bound (printed; asserted <= 60 s);
#  - reads never fail for longer than writes take to recover (and never > 60 s);
#  - no write is ever routed to a node in recovery: every successful write's own statement
#    returns pg_is_in_recovery() = false, no write fails with 25006 (read-only transaction),
#    and every acknowledged row is present on the final primary.
# Before that, part 1 (always run, plain servers): a primary with default_transaction_read_only
# = on (what pg_auto_failover sets on the node it promotes until the old primary is demoted)
# is routed no writes, with a reason, but still serves reads; writable again, it takes writes.
# Part 2 is skipped (only) when pg_autoctl or the pgautofailover extension is not installed
# for the PostgreSQL under test. About 50 s on the 2-core test machine (up to 180 s under load).

use strict;
use warnings FATAL => 'all';

use File::Basename qw(dirname);
use File::Path qw(make_path);
use IPC::Run;
use POSIX ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

# The asserted bound on "failover started -> writes reach the new primary" (seconds). The
# measured value is printed; this only catches a router that never follows the failover.
my $BOUND = 60;

# ---------------------------------------------------------------------------------------
# The PostgreSQL under test (the pg_ctl that PostgreSQL::Test::Cluster runs: the first in
# PATH, which PGXS's installcheck puts first) and pg_auto_failover for it.

sub find_in_path
{
	my ($cmd) = @_;
	for my $dir (split /:/, $ENV{PATH} // '')
	{
		return "$dir/$cmd" if $dir ne '' && -x "$dir/$cmd";
	}
	return undef;
}

my $pg_ctl = find_in_path('pg_ctl');
my $bindir = defined $pg_ctl ? dirname($pg_ctl) : undef;
my $pg_config = defined $bindir ? "$bindir/pg_config" : undef;
my $pg_autoctl = find_in_path('pg_autoctl');
my $why_skip;
if (!defined $pg_config || !-x $pg_config)
{
	$why_skip = 'no pg_config next to the pg_ctl in PATH';
}
elsif (!defined $pg_autoctl)
{
	$why_skip = 'pg_auto_failover is not installed (no pg_autoctl in PATH; Debian package '
	  . 'postgresql-15-auto-failover, which scripts/deps.sh installs)';
}
else
{
	my $sharedir = `'$pg_config' --sharedir`;
	my $pkglibdir = `'$pg_config' --pkglibdir`;
	chomp($sharedir, $pkglibdir);
	$why_skip = "the pgautofailover extension is not installed in $sharedir/extension and "
	  . "$pkglibdir (Debian package postgresql-15-auto-failover)"
	  unless -f "$sharedir/extension/pgautofailover.control"
	  && -f "$pkglibdir/pgautofailover.so";
	if (!$why_skip)
	{
		my $version = `'$pg_autoctl' version 2>&1`;
		$why_skip = "pg_autoctl does not run: $version" if $? != 0;
		note "pg_autoctl: $pg_autoctl, " . (split /\n/, $version)[0] if !$why_skip;
	}
}

# ---------------------------------------------------------------------------------------
# The coordinator. Latency and lag thresholds are off (a loaded test machine must not make
# the primary degraded, which would route it no writes); checks every 200 ms; a failed node
# is retried at least every second.

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '200ms'
peerpool.health_check_timeout = '2s'
peerpool.unhealthy_threshold = 2
peerpool.connect_timeout = '2s'
peerpool.reconnect_backoff_initial = '200ms'
peerpool.reconnect_backoff_max = '1s'
peerpool.degraded_latency = 0
peerpool.unhealthy_latency = 0
peerpool.degraded_lag = 0
peerpool.unhealthy_lag = 0
EOC

# ---------------------------------------------------------------------------------------
# Part 1 (runs without pg_auto_failover too): a primary whose new sessions are read-only
# (default_transaction_read_only = on, as pg_auto_failover sets it on the node it promotes
# until the old primary is demoted) keeps its role and serves reads, but gets no 'write'
# calls; once writable again, it gets them at once.

{
	my ($plain) = PeerpoolFleet::peers(1, prefix => 'plain');
	PeerpoolFleet::register($coord, $plain);
	PeerpoolFleet::timed_ok(
		PeerpoolFleet::wait_for_health($coord,
			"count(*) FILTER (WHERE node_name = 'plain1' AND state = 'healthy' AND role = 'primary') = 1", 30),
		30, 'plain1: healthy primary');
	my $write = q{SELECT * FROM peerpool.pool_query('SELECT NOT pg_is_in_recovery()', 'write') AS t(w boolean)};
	is($coord->safe_psql('postgres', $write), 't', 'plain1 takes writes');

	$plain->safe_psql('postgres',
		'ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()');
	my $t = time;
	my ($ret, $err);
	my $deadline = time + 30;
	# Until the next check sees the setting, a write may still be routed there and fail on
	# the node itself (25006): that is the check interval's window, not what this tests.
	do
	{
		($ret, $err) = PeerpoolFleet::psql_error($coord, "$write;");
		usleep(50_000) unless $ret != 0 && $err =~ /08006/;
	} while (!($ret != 0 && $err =~ /08006/) && time < $deadline);
	isnt($ret, 0, 'read-only plain1: a write call fails');
	note sprintf('write refused %.2f s after default_transaction_read_only = on was reloaded', time - $t);
	like($err, qr/08006/, '... with 08006: not routed there');
	like($err, qr/plain1: read-only \(default_transaction_read_only is on\)/,
		'... and the reason names the read-only setting');
	is( $coord->safe_psql('postgres',
			q{SELECT r FROM peerpool.pool_query('SELECT pg_is_in_recovery()', 'read') AS t(r boolean)}),
		'f', 'read-only plain1 still serves reads');
	is( $coord->safe_psql('postgres',
			q{SELECT state || ',' || role FROM peerpool.node_health WHERE node_name = 'plain1'}),
		'healthy,primary', 'read-only plain1 stays a healthy primary');

	$plain->safe_psql('postgres',
		'ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf()');
	$t = time;
	$deadline = time + 30;
	do
	{
		($ret, $err) = PeerpoolFleet::psql_error($coord, "$write;");
		usleep(50_000) if $ret != 0;
	} while ($ret != 0 && time < $deadline);
	is($ret, 0, 'writable again: plain1 takes writes') or diag $err;
	note sprintf('writes accepted %.2f s after the setting was reset', time - $t);

	$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('plain1')");
	$plain->stop;
}

if ($why_skip)
{
	SKIP: { skip "real fleet with pg_auto_failover: $why_skip", 1; }
	$coord->stop;
	done_testing();
	exit 0;
}

# ---------------------------------------------------------------------------------------
# pg_autoctl processes: each node's `pg_autoctl create ... --run` runs in the background with
# its own log; configuration, state and pid files under the test's directory (XDG_*), Unix
# sockets in a short private directory, listening on 127.0.0.1 only.

my $base = PostgreSQL::Test::Utils::tempdir('autofailover');
my $sockdir = PostgreSQL::Test::Utils::tempdir_short();
make_path("$base/xdg/config", "$base/xdg/data", "$base/xdg/run");
chmod 0700, "$base/xdg/run";

my %autoctl_env = (
	PG_CONFIG           => $pg_config,
	XDG_CONFIG_HOME     => "$base/xdg/config",
	XDG_DATA_HOME       => "$base/xdg/data",
	XDG_RUNTIME_DIR     => "$base/xdg/run",
	PG_REGRESS_SOCK_DIR => $sockdir,
	PGHOST              => $sockdir,);

# name => { pgdata, port, log, h (IPC::Run harness) }
my %autoctl;
my @started;    # names, in start order

sub autoctl_cmd
{
	my (@args) = @_;
	local %ENV = (%ENV, %autoctl_env);
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run([ $pg_autoctl, @args ], '<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout(180));
	};
	$err .= $@ if $@;
	return ($ok, $out, $err);
}

sub autoctl_start
{
	my ($name, @args) = @_;
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $pgdata = "$base/$name";
	my $log = "$PostgreSQL::Test::Utils::log_path/autoctl_$name.log";
	# fork + exec rather than IPC::Run: the test waits for this pid itself (waitpid).
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		%ENV = (%ENV, %autoctl_env);
		open STDIN, '<', '/dev/null' or POSIX::_exit(127);
		open STDOUT, '>>', $log or POSIX::_exit(127);
		open STDERR, '>&', \*STDOUT or POSIX::_exit(127);
		{ exec $pg_autoctl, @args,
		  '--pgdata'   => $pgdata,
		  '--pgport'   => $port,
		  '--pgctl'    => $pg_ctl,
		  '--hostname' => '127.0.0.1',
		  '--listen'   => '127.0.0.1',
		  '--auth'     => 'trust',
		  '--no-ssl',
		  '--run'; }
		POSIX::_exit(127);
	}
	$autoctl{$name} = { pgdata => $pgdata, port => $port, log => $log, pid => $pid };
	push @started, $name;
	note "started pg_autoctl for $name (pid $pid, port $port, log $log)";
	return $autoctl{$name};
}

sub pid_alive
{
	my ($pid) = @_;
	return $pid && kill(0, $pid);
}

# The postmaster pid in a data directory, if that process still exists.
sub postmaster_pid
{
	my ($pgdata) = @_;
	open my $fh, '<', "$pgdata/postmaster.pid" or return undef;
	my $pid = <$fh>;
	close $fh;
	chomp $pid if defined $pid;
	return pid_alive($pid) ? $pid : undef;
}

# `pg_autoctl stop` for every node we started (newest first), then wait; whatever is still
# running after that (the supervisor, or a postmaster it left behind) is killed by pid.
my $stopped = 0;

sub autoctl_stop_all
{
	return if $stopped++;
	for my $name (reverse @started)
	{
		my $a = $autoctl{$name};
		my ($ok, $out, $err) = autoctl_cmd('stop', '--pgdata', $a->{pgdata});
		note "pg_autoctl stop $name: " . ($ok ? 'ok' : "failed: $err");
	}
	for my $name (reverse @started)
	{
		my $a = $autoctl{$name};
		my $deadline = time + 30;
		my $gone = 0;
		while (!$gone && time < $deadline)
		{
			$gone = waitpid($a->{pid}, POSIX::WNOHANG()) != 0;
			usleep(100_000) unless $gone;
		}
		if (!$gone)
		{
			diag "pg_autoctl for $name (pid $a->{pid}) did not stop within 30 s: killing it";
			kill 'TERM', $a->{pid};
			my $d = time + 10;
			usleep(100_000) while waitpid($a->{pid}, POSIX::WNOHANG()) == 0 && time < $d;
			if (waitpid($a->{pid}, POSIX::WNOHANG()) == 0)
			{
				kill 'KILL', $a->{pid};
				waitpid($a->{pid}, 0);
			}
		}
		my $pm = postmaster_pid($a->{pgdata});
		if ($pm)
		{
			diag "postmaster $pm of $name still running: stopping it (immediate)";
			kill 'QUIT', $pm;
			my $d = time + 10;
			usleep(100_000) while pid_alive($pm) && time < $d;
			kill 'KILL', $pm if pid_alive($pm);
		}
	}
	return;
}

END
{
	my $rc = $?;
	autoctl_stop_all() if @started;
	$? = $rc;
}

# ---------------------------------------------------------------------------------------
# The monitor and its view of the formation.

my $t_setup = time;
my $monitor = autoctl_start('monitor', 'create', 'monitor');
my $monitor_uri = sprintf('postgres://autoctl_node@127.0.0.1:%d/pg_auto_failover?sslmode=disable',
	$monitor->{port});

# Runs SQL on the monitor (or on a data node, given a conninfo); returns (ok, stdout).
sub psql_at
{
	my ($conninfo, $sql) = @_;
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ "$bindir/psql", '-XAtq', '-d', $conninfo, '-c', $sql ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(60));
	chomp $out;
	return ($ok, $ok ? $out : $err);
}

sub node_conninfo
{
	my ($name) = @_;
	my $user = getpwuid($<) // $ENV{USER};
	return sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s',
		$autoctl{$name}{port}, $user);
}

# The formation as the monitor sees it: "name:reported/goal,..." ordered by node id.
sub formation_state
{
	my ($ok, $out) = psql_at($monitor_uri,
		q{SELECT string_agg(nodename || ':' || reportedstate || '/' || goalstate, ',' ORDER BY nodeid)
		    FROM pgautofailover.node});
	return $ok ? $out : "(monitor: $out)";
}

# Polls formation_state until it equals $want; returns elapsed seconds or undef.
sub wait_formation
{
	my ($want, $timeout, $what) = @_;
	my $start = time;
	my $last = '';
	while (time - $start < $timeout)
	{
		$last = formation_state();
		return time - $start if $last eq $want;
		usleep(200_000);
	}
	diag "$what: formation still '$last' after ${timeout}s (want '$want')";
	return undef;
}

my $elapsed;
{
	my $start = time;
	my $ok = 0;
	while (time - $start < 120)
	{
		($ok) = psql_at($monitor_uri, 'SELECT 1');
		last if $ok;
		usleep(200_000);
	}
	ok($ok, 'the pg_auto_failover monitor accepts connections')
	  or BAIL_OUT("monitor did not start; see $monitor->{log}");
	note sprintf('monitor up after %.1f s', time - $start);
}

# ---------------------------------------------------------------------------------------
# The primary, then the secondary (pg_basebackup from the primary).

autoctl_start('node1', 'create', 'postgres', '--name' => 'node1', '--monitor' => $monitor_uri);
$elapsed = wait_formation('node1:single/single', 120, 'node1 single');
ok(defined $elapsed, 'node1 registered and running as single')
  or BAIL_OUT("node1 did not start; see $autoctl{node1}{log}");
note sprintf('node1 single after %.1f s', $elapsed // 0);

autoctl_start('node2', 'create', 'postgres', '--name' => 'node2', '--monitor' => $monitor_uri);
$elapsed = wait_formation('node1:primary/primary,node2:secondary/secondary', 180,
	'primary and secondary');
ok(defined $elapsed, 'node1 primary, node2 secondary')
  or BAIL_OUT("the pair did not form; see $autoctl{node1}{log} and $autoctl{node2}{log}");
note sprintf('primary/secondary pair formed after %.1f s (setup so far %.1f s)',
	$elapsed // 0, time - $t_setup);

my ($p1, $p2) = ($autoctl{node1}{port}, $autoctl{node2}{port});
my ($ok, $out) = psql_at(node_conninfo('node1'),
	'CREATE TABLE ff (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());'
	  . ' SELECT pg_is_in_recovery()');
is($out, 'f', 'node1 (primary) reachable over TCP from the coordinator\'s side; table created');
($ok, $out) = psql_at(node_conninfo('node2'), 'SELECT pg_is_in_recovery()');
is($out, 't', 'node2 (secondary) reachable over TCP and in recovery');

# ---------------------------------------------------------------------------------------
# The coordinator (started above) registers both data nodes with role auto.

for my $name ('node1', 'node2')
{
	$coord->safe_psql('postgres',
		sprintf("SELECT peerpool.pool_add_node(%s, %s, role => 'auto')",
			PeerpoolFleet::quote($name), PeerpoolFleet::quote(node_conninfo($name))));
}
$elapsed = PeerpoolFleet::wait_for_health(
	$coord,
	"count(*) FILTER (WHERE node_name = 'node1' AND state = 'healthy' AND role = 'primary') = 1"
	  . " AND count(*) FILTER (WHERE node_name = 'node2' AND state = 'healthy' AND role = 'standby') = 1",
	30);
PeerpoolFleet::timed_ok($elapsed, 30, 'coordinator: node1 healthy primary, node2 healthy standby');

# ---------------------------------------------------------------------------------------
# The client loop, inside the coordinator: a write then a read per iteration, each call
# logged (committed at once) with its start and end, outcome, SQLSTATE, and the answering
# server's port and pg_is_in_recovery() from the same statement. It runs until told to stop.

$coord->safe_psql('postgres', q{
CREATE TABLE client_log (seq int, kind text, t0 timestamptz, t1 timestamptz, ok boolean,
    in_recovery boolean, port int, sqlstate text, err text);
CREATE TABLE client_ctl (stop boolean);
CREATE PROCEDURE client_loop(max_s float8) LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => max_s);
    i int := 0;
    t timestamptz;
    r record;
    st text;
    msg text;
BEGIN
    LOOP
        EXIT WHEN clock_timestamp() > deadline OR EXISTS (SELECT FROM client_ctl WHERE stop);
        i := i + 1;
        t := clock_timestamp();
        BEGIN
            SELECT * INTO r FROM peerpool.pool_query(
                format('INSERT INTO ff (id) VALUES (%s) RETURNING pg_is_in_recovery(), inet_server_port()', i),
                'write', 5000) AS q(rec boolean, port int);
            INSERT INTO client_log VALUES (i, 'write', t, clock_timestamp(), true, r.rec, r.port, NULL, NULL);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            INSERT INTO client_log VALUES (i, 'write', t, clock_timestamp(), false, NULL, NULL, st, msg);
        END;
        COMMIT;
        t := clock_timestamp();
        BEGIN
            SELECT * INTO r FROM peerpool.pool_query(
                'SELECT pg_is_in_recovery(), inet_server_port(), (SELECT count(*) FROM ff)',
                'read', 5000) AS q(rec boolean, port int, n bigint);
            INSERT INTO client_log VALUES (i, 'read', t, clock_timestamp(), true, r.rec, r.port, NULL, NULL);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            INSERT INTO client_log VALUES (i, 'read', t, clock_timestamp(), false, NULL, NULL, st, msg);
        END;
        COMMIT;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
});

my $loop = PeerpoolFleet::psql_start($coord, ['CALL client_loop(240)'], timeout => 300);
ok( PeerpoolFleet::wait_until($coord,
		"SELECT count(*) FILTER (WHERE kind = 'write' AND ok) >= 10"
		  . " AND count(*) FILTER (WHERE kind = 'read' AND ok) >= 10 FROM client_log",
		timeout => 30),
	'client loop: writes and reads succeed before the failover');

# ---------------------------------------------------------------------------------------
# The failover, orchestrated by the monitor.

my $t_fo = time;
my ($fo_ok, $fo_out, $fo_err) =
  autoctl_cmd('perform', 'failover', '--monitor', $monitor_uri, '--formation', 'default',
	'--group', '0', '--wait', '120');
note sprintf('pg_autoctl perform failover returned after %.1f s (%s)',
	time - $t_fo, $fo_ok ? 'exit 0' : 'failed');
note "pg_autoctl perform failover output:\n$fo_out$fo_err";
$elapsed = wait_formation('node1:secondary/secondary,node2:primary/primary', 120,
	'roles swapped');
ok(defined $elapsed, 'the monitor reports node2 primary, node1 secondary');
note sprintf('formation converged %.1f s after the failover started', time - $t_fo);

# The coordinator follows: node2 a healthy primary, node1 a healthy standby.
$elapsed = PeerpoolFleet::wait_for_health(
	$coord,
	"count(*) FILTER (WHERE node_name = 'node2' AND state = 'healthy' AND role = 'primary') = 1"
	  . " AND count(*) FILTER (WHERE node_name = 'node1' AND state = 'healthy' AND role = 'standby') = 1",
	60, start => $t_fo);
ok(defined $elapsed, 'coordinator: node2 healthy primary, node1 healthy standby');
note sprintf('coordinator saw the swapped roles %.1f s after the failover started', $elapsed // -1);

# A few more calls against the settled fleet, then stop the loop.
my $t_settled = time;
ok( PeerpoolFleet::wait_until($coord,
		sprintf("SELECT count(*) FILTER (WHERE kind = 'write' AND ok) >= 5"
			  . " AND count(*) FILTER (WHERE kind = 'read' AND ok) >= 5"
			  . ' FROM client_log WHERE t0 > to_timestamp(%.6f)', $t_settled),
		timeout => 30),
	'client loop: writes and reads succeed on the settled fleet');
$coord->safe_psql('postgres', 'INSERT INTO client_ctl VALUES (true)');
my ($loop_rc, $loop_out, $loop_err) = PeerpoolFleet::psql_finish($loop);
is($loop_rc, 0, 'client loop ended cleanly') or diag $loop_err;

# ---------------------------------------------------------------------------------------
# What the client saw.

my @calls;
for my $line (split /\n/, $coord->safe_psql('postgres',
	q{SELECT seq, kind, extract(epoch FROM t0), extract(epoch FROM t1), ok,
	         coalesce(in_recovery::text, ''), coalesce(port, 0), coalesce(sqlstate, ''),
	         coalesce(replace(err, E'\n', ' '), '')
	    FROM client_log ORDER BY t0, kind DESC}))
{
	my ($seq, $kind, $t0, $t1, $okc, $rec, $port, $state, $err) = split /\|/, $line, 9;
	push @calls, { seq => $seq, kind => $kind, t0 => $t0, t1 => $t1, ok => $okc eq 't',
		rec => $rec, port => $port, sqlstate => $state, err => $err };
}
my @writes = grep { $_->{kind} eq 'write' } @calls;
my @reads  = grep { $_->{kind} eq 'read' } @calls;
my @ok_writes = grep { $_->{ok} } @writes;
note sprintf('client loop: %d writes (%d ok), %d reads (%d ok)',
	scalar @writes, scalar @ok_writes, scalar @reads, scalar(grep { $_->{ok} } @reads));
my %errors;
$errors{"$_->{kind} $_->{sqlstate}: " . substr($_->{err}, 0, 160)}++ for grep { !$_->{ok} } @calls;
note "failed calls by kind and error:\n" . join("\n", map { "  $errors{$_} x $_" } sort keys %errors)
  if %errors;

# No write routed to a node in recovery.
is(scalar(grep { $_->{rec} ne 'false' } @ok_writes), 0,
	'every successful write ran on a server not in recovery (its own statement said so)');
is(scalar(grep { !$_->{ok} && $_->{sqlstate} eq '25006' } @writes), 0,
	'no write failed as read-only (25006): none was routed to a standby');
is(scalar(grep { $_->{port} != $p1 && $_->{port} != $p2 } @ok_writes), 0,
	'every write answered by node1 or node2');

# Writes reach the new primary within a bound.
my ($first_new) = grep { $_->{port} == $p2 && $_->{t0} > $t_fo } @ok_writes;
my @old_before = grep { $_->{port} == $p1 && (!$first_new || $_->{t1} <= $first_new->{t1}) } @ok_writes;
my $last_old = $old_before[-1];
ok(defined $first_new, 'writes reach the new primary (node2)');
is(scalar(grep { $_->{port} == $p1 && $first_new && $_->{t0} > $first_new->{t1} } @ok_writes), 0,
	'no write reached the old primary after the first write on the new one');
my $write_bound = $first_new ? $first_new->{t1} - $t_fo : 9999;
my $write_gap = $first_new && $last_old ? $first_new->{t1} - $last_old->{t1} : 9999;
note sprintf('failover started -> first write acknowledged by the new primary: %.2f s', $write_bound);
note sprintf('write outage (last write on the old primary -> first on the new): %.2f s', $write_gap);
cmp_ok($write_bound, '<=', $BOUND, "writes reach the new primary within $BOUND s");

# Reads: the longest stretch of failed reads, from the first failed call's start to the end
# of the next successful one.
my ($read_outage, $run_start) = (0, undef);
for my $r (@reads)
{
	if (!$r->{ok})
	{
		$run_start //= $r->{t0};
	}
	elsif (defined $run_start)
	{
		$read_outage = $r->{t1} - $run_start if $r->{t1} - $run_start > $read_outage;
		undef $run_start;
	}
}
ok(!defined $run_start, 'the last read succeeded');
note sprintf('longest read outage: %.2f s (%d failed reads of %d)', $read_outage,
	scalar(grep { !$_->{ok} } @reads), scalar @reads);
cmp_ok($read_outage, '<=', $write_bound + 1,
	'reads never fail for longer than writes take to reach the new primary (+1 s)');
cmp_ok($read_outage, '<=', $BOUND, "reads never fail for longer than $BOUND s");

# Every acknowledged row is on the final primary (pg_auto_failover replicates synchronously).
my $acked = join(',', sort { $a <=> $b } map { $_->{seq} } @ok_writes);
($ok, $out) = psql_at(node_conninfo('node2'),
	"SELECT string_agg(id::text, ',' ORDER BY id) FROM ff WHERE id IN (" . ($acked || 'NULL') . ')');
is($out, $acked, 'every acknowledged write is on the final primary (node2)');

# ---------------------------------------------------------------------------------------
# The role change as the coordinator's events show it.

my @ev2 = PeerpoolFleet::events($coord, 'node2', since => $t_fo);
my @ev1 = PeerpoolFleet::events($coord, 'node1', since => $t_fo);
note "node1 (old primary) events after the failover:\n"
  . join("\n", map { sprintf('  %.2f s %s->%s: %s', $_->{at_epoch} - $t_fo, $_->{from}, $_->{to}, $_->{reason}) } @ev1);
note "node2 (new primary) events after the failover:\n"
  . join("\n", map { sprintf('  %.2f s %s->%s: %s', $_->{at_epoch} - $t_fo, $_->{from}, $_->{to}, $_->{reason}) } @ev2);

my ($tr2) = grep { $_->{to} eq 'transitioning' } @ev2;
ok(defined $tr2, 'node2 (promoted) seen transitioning');
like($tr2 ? $tr2->{reason} : '', qr/standby to primary/, 'its reason: role changed from standby to primary');
ok(scalar(grep { $_->{from} eq 'healthy' } @ev1), 'node1 (old primary) left healthy after the failover');
# Its role changed while it was down (or while it served): a role change all the same.
my ($tr1) = grep { $_->{to} eq 'transitioning' } @ev1;
ok(defined $tr1, 'node1 (old primary) seen transitioning')
  or diag 'node1 events: ' . join(', ', PeerpoolFleet::transitions(@ev1));
like($tr1 ? $tr1->{reason} : '', qr/primary to standby/, 'its reason: role changed from primary to standby');
my ($back1) = grep { $_->{from} eq 'transitioning' && $_->{to} eq 'healthy' && $_->{reason} =~ /standby confirmed/ } @ev1;
ok(defined $back1, 'node1 came back with its new role confirmed: standby')
  or diag 'node1 events: ' . join(', ', PeerpoolFleet::transitions(@ev1));

# ---------------------------------------------------------------------------------------

autoctl_stop_all();
for my $name (@started)
{
	ok(!postmaster_pid($autoctl{$name}{pgdata}) && !pid_alive($autoctl{$name}{pid}),
		"$name: server and pg_autoctl stopped");
}
PeerpoolFleet::check_logs($coord);
$coord->stop;
note sprintf('whole test: %.1f s', time - $t_setup);

done_testing();
