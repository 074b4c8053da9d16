# Copyright (c) pg_peerpool contributors

# A real fleet (issue 11 item 4): a node registered through Debian's pgbouncer in transaction
# mode. What this test establishes (docs/configuration.md, "Through pgbouncer"):
#
# - pgbouncer 1.18 refuses the `options` startup parameter that every pooled connection sends
#   (DateStyle, IntervalStyle, extra_float_digits): `ignore_startup_parameters = options` is
#   required, and the result formats then come from the peer's settings for pgbouncer's server
#   user (ALTER ROLE ... SET), not from pg_peerpool.
# - Health checks keep the node healthy; pool_query, parallel_query and parallel_query_rows work,
#   a 100,000-row result arrives intact.
# - Cancelling the caller ends it with 57014 at once, and the remote query is cancelled within
#   1 s: pg_peerpool sends the protocol's CancelRequest (PQcancel, as psql does), which pgbouncer
#   forwards to the server process running the query. (0.2.0 as first landed sent
#   pg_cancel_backend(<PQbackendPID>), which behind pgbouncer is pgbouncer's cancel key, not a
#   server pid: the remote query ran on.) Repeated cancels work, and the node answers after them.
# - Session reset: peerpool.reset_query runs on whatever server connection pgbouncer picks for
#   it, so in transaction mode a call waiting in pgbouncer's queue can receive the server the
#   previous call dirtied before that call's DISCARD ALL arrives. With pgbouncer's
#   server_reset_query_always = 1 (server_reset_query = DISCARD ALL) it cannot, also with
#   peerpool.reset_query = ''.
#
# pgbouncer runs as the test's OS user, listens on 127.0.0.1 on a free port in 48000-48999 and
# on a Unix socket in the test's directory, and is stopped by its pid at the end.

use strict;
use warnings FATAL => 'all';

use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $pgbouncer = $ENV{PGBOUNCER} // '/usr/sbin/pgbouncer';
if (!-x $pgbouncer)
{
	# scripts/deps.sh installs it; CI must not skip silently.
	BAIL_OUT("$pgbouncer not found (scripts/deps.sh installs pgbouncer)") if ($ENV{CI} // '') eq 'true';
	plan skip_all => "$pgbouncer not found (scripts/deps.sh installs pgbouncer)";
}

# A TCP port in 48000-48999 that nothing listens on now.
sub free_port
{
	for (1 .. 500)
	{
		my $port = 48000 + int(rand(1000));
		my $s = IO::Socket::INET->new(
			LocalAddr => '127.0.0.1',
			LocalPort => $port,
			Proto     => 'tcp',
			Listen    => 1) or next;
		close $s;
		return $port;
	}
	die 'no free port in 48000-48999';
}

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '300ms'
peerpool.health_check_timeout = '2s'
peerpool.degraded_latency = '2s'
peerpool.connect_timeout = '2s'
EOC
# The peer's own output formats differ from pg_peerpool's, so a lost `options` shows.
my ($peer) = PeerpoolFleet::peers(1, conf => <<'EOC');
DateStyle = 'SQL, DMY'
IntervalStyle = 'sql_standard'
EOC
my $user = getpwuid($<) // $ENV{USER};
# pgbouncer's server user for node "bnc" gets pg_peerpool's formats (the documented setup);
# "rawuser" (node "raw") does not.
$peer->safe_psql('postgres', <<"EOS");
ALTER ROLE "$user" SET DateStyle = 'ISO';
ALTER ROLE "$user" SET IntervalStyle = 'postgres';
ALTER ROLE "$user" SET extra_float_digits = 3;
CREATE ROLE rawuser LOGIN SUPERUSER;
CREATE SCHEMA evil;
EOS

# ---------------------------------------------------------------------------------------
# pgbouncer

my $dir = PostgreSQL::Test::Utils::tempdir('pgbouncer');
my $port = free_port();
my $pid_file = "$dir/pgbouncer.pid";
my $bouncer_pid;

sub write_bouncer_ini
{
	my (%o) = @_;
	my $peer_port = $peer->port;
	open my $fh, '>', "$dir/userlist.txt" or die $!;
	print $fh qq{"$user" ""\n"rawuser" ""\n};
	close $fh;
	open $fh, '>', "$dir/pgbouncer.ini" or die $!;
	print $fh <<"EOI";
[databases]
peerdb = host=127.0.0.1 port=$peer_port dbname=postgres user=$user
peerone = host=127.0.0.1 port=$peer_port dbname=postgres user=$user pool_size=1
peerraw = host=127.0.0.1 port=$peer_port dbname=postgres user=rawuser

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = $user
pool_mode = transaction
default_pool_size = 4
logfile = $dir/pgbouncer.log
pidfile = $pid_file
ignore_startup_parameters = options
server_reset_query = DISCARD ALL
server_reset_query_always = $o{reset_always}
EOI
	close $fh;
	return;
}

# A query on pgbouncer's admin console.
sub bouncer_admin
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[
			$coord->installed_command('psql'), '-XAtq', '-d',
			"host=127.0.0.1 port=$port dbname=pgbouncer user=$user", '-c', $sql
		],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(20));
	chomp $out;
	return $out;
}

write_bouncer_ini(reset_always => 0);
system($pgbouncer, '-d', '-q', "$dir/pgbouncer.ini") == 0 or BAIL_OUT("pgbouncer did not start: $?");
my $deadline = time + 20;
until (-s $pid_file && IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp'))
{
	BAIL_OUT('pgbouncer is not listening') if time > $deadline;
	usleep(50_000);
}
$bouncer_pid = slurp_file($pid_file);
chomp $bouncer_pid;
note "pgbouncer pid $bouncer_pid on 127.0.0.1:$port; " . `$pgbouncer --version 2>&1 | head -1`;

# Stops pgbouncer by its pid; true once it is gone.
sub stop_bouncer
{
	return 1 unless $bouncer_pid && kill(0, $bouncer_pid);
	kill 'TERM', $bouncer_pid;
	my $until = time + 10;
	usleep(50_000) while kill(0, $bouncer_pid) && time < $until;
	return !kill(0, $bouncer_pid);
}
END { stop_bouncer(); } # also when the test dies on the way

# ---------------------------------------------------------------------------------------
# Registration and health checks

sub bouncer_conninfo
{
	my ($db) = @_;
	return "host=127.0.0.1 port=$port dbname=$db user=$user";
}
$coord->safe_psql('postgres', sprintf(<<'EOS',
SELECT peerpool.pool_add_node('direct', %s, min_connections => 1, max_connections => 2);
SELECT peerpool.pool_add_node('bnc', %s, min_connections => 1, max_connections => 3);
SELECT peerpool.pool_add_node('raw', %s, min_connections => 1, max_connections => 1);
SELECT peerpool.pool_add_node('bnc1', %s, min_connections => 2, max_connections => 2);
EOS
	map { PeerpoolFleet::quote($_) } PeerpoolFleet::peer_conninfo($peer),
	bouncer_conninfo('peerdb'), bouncer_conninfo('peerraw'), bouncer_conninfo('peerone')));
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 4", 30),
	30, 'all four nodes (three through pgbouncer) healthy');

# Health checks through pgbouncer keep the node healthy: ten more checks, no other state.
my $since = $coord->safe_psql('postgres', 'SELECT now()');
my $checks = PeerpoolFleet::wait_until($coord,
	"SELECT last_check > '$since'::timestamptz + interval '3 s' FROM peerpool.node_health WHERE node_name = 'bnc'",
	timeout => 30);
ok(defined $checks, 'health checks through pgbouncer keep running');
is( $coord->safe_psql('postgres',
		"SELECT state || '|' || consecutive_failures || '|' || coalesce(last_error, '') "
		  . "FROM peerpool.node_health WHERE node_name = 'bnc'"),
	'healthy|0|', 'bnc stays healthy, no failed check');
is( $coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.events WHERE node_name LIKE 'bnc%' AND to_state <> 'healthy' "
		  . "AND from_state <> 'disconnected'"),
	'0', 'no event took a node behind pgbouncer out of healthy');

# ---------------------------------------------------------------------------------------
# Both query functions

is( $coord->safe_psql('postgres',
		q{SELECT * FROM peerpool.pool_query('SELECT 41 + 1, current_user', 'bnc') AS t(a int, u text)}),
	"42|$user", 'pool_query through pgbouncer');
is( $coord->safe_psql('postgres',
		q{SELECT string_agg(node_name || ':' || success || ':' || coalesce(result::text, error), ' ' ORDER BY node_name)
		  FROM peerpool.parallel_query('SELECT 1 AS one')}),
	'bnc:true:[{"one": 1}] bnc1:true:[{"one": 1}] direct:true:[{"one": 1}] raw:true:[{"one": 1}]',
	'parallel_query over the direct node and the three through pgbouncer');
is( $coord->safe_psql('postgres',
		q{SELECT string_agg(n || ':' || v, ' ' ORDER BY n)
		  FROM peerpool.parallel_query_rows('SELECT 7', ARRAY['bnc', 'direct'], on_error => 'error') AS t(n text, v int)}),
	'bnc:7 direct:7', 'parallel_query_rows through pgbouncer');

# A large result arrives intact: count and md5 equal to the direct node's.
my $big = q{SELECT g AS i, md5(g::text) || repeat('x', 100) AS payload FROM generate_series(1, 100000) g};
my %big;
for my $n ('direct', 'bnc')
{
	my ($secs, $out) = PeerpoolFleet::timed_psql($coord, sprintf(
		q{SELECT count(*) || '|' || md5(string_agg(i || ',' || payload, ';' ORDER BY i))
		  FROM peerpool.pool_query(%s, '%s') AS t(i int, payload text)},
		PeerpoolFleet::quote($big), $n));
	$big{$n} = $out;
	note sprintf('100,000 rows (about 14 MB) from %s in %.2f s', $n, $secs);
}
like($big{bnc}, qr/^100000\|[0-9a-f]{32}$/, '100,000 rows through pgbouncer');
is($big{bnc}, $big{direct}, 'the same rows (md5) as straight from the peer');

# Output formats: pgbouncer dropped the `options` startup parameter; the role settings of the
# server user stand in for them (bnc), without them the peer's own formats show (raw).
my $formats = q{SELECT timestamp '2024-03-05 06:07:08' AS ts, interval '1 day 02:03:04' AS iv, 0.1::float8 + 0.2 AS f};
my %fmt;
for my $n ('direct', 'bnc', 'raw')
{
	$fmt{$n} = $coord->safe_psql('postgres', sprintf(
		q{SELECT * FROM peerpool.pool_query(%s, '%s') AS t(ts text, iv text, f text)},
		PeerpoolFleet::quote($formats), $n));
	note "formats via $n: $fmt{$n}";
}
is($fmt{direct}, '2024-03-05 06:07:08|1 day 02:03:04|0.30000000000000004', 'direct: pg_peerpool formats');
is($fmt{bnc}, $fmt{direct}, 'through pgbouncer with the role settings: the same formats');
isnt($fmt{raw}, $fmt{direct}, 'through pgbouncer without them: the peer\'s own formats (options were dropped)');

# ---------------------------------------------------------------------------------------
# Cancellation

my $sleep_active = q{(SELECT count(*) FILTER (WHERE state = 'active' AND query = 'SELECT pg_sleep(30)') FROM pg_stat_activity)};

# One cancelled call: returns (caller's seconds, caller's stderr, seconds until the remote
# query was gone after the caller's deadline or undef if it still ran after $watch_s).
sub cancelled_call
{
	my ($watch_s) = @_;
	my $caller = PeerpoolFleet::psql_start($coord,
		[ "SET statement_timeout = '500ms'",
		  q{SELECT * FROM peerpool.pool_query('SELECT pg_sleep(30)', 'bnc') AS t(a text)} ]);
	ok(PeerpoolFleet::wait_until($peer, "SELECT $sleep_active = 1", timeout => 20),
		'the remote pg_sleep(30) runs on the peer');
	my ($ret, $out, $err) = PeerpoolFleet::psql_finish($caller);
	my $returned = $caller->{finished} - $caller->{started};
	# Polled here rather than with wait_until, whose diag on timeout would read as a failure
	# in the TODO case, where the query is expected to outlive the watch.
	my $gone;
	while (time < $caller->{finished} + $watch_s)
	{
		if ($peer->safe_psql('postgres', "SELECT $sleep_active = 0") eq 't')
		{
			$gone = time - $caller->{finished};
			last;
		}
		usleep(20_000);
	}
	return ($returned, $ret, $err, $gone);
}

for my $round (1 .. 3)
{
	my ($returned, $ret, $err, $gone) = cancelled_call(5);
	isnt($ret, 0, "cancel $round: the caller failed");
	like($err, qr/57014/, "cancel $round: with 57014");
	cmp_ok($returned, '<', 10, "cancel $round: the caller returned in bounded time");
	note sprintf('cancel %d: caller returned %.2f s after it started (statement_timeout 500ms); remote query %s',
		$round, $returned,
		defined $gone ? sprintf('gone %.3f s after the caller returned', $gone) : 'still running 5 s after the caller returned');
	ok(defined $gone && $gone < 1, "cancel $round: the remote query is gone within 1 s (SPEC 5)");
	# Clean up whatever is left, so a failure above does not cascade.
	$peer->safe_psql('postgres',
		q{SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'});
	ok(PeerpoolFleet::wait_until($peer, "SELECT $sleep_active = 0", timeout => 20), "cancel $round: nothing left running");
}
unlike(slurp_file($coord->logfile), qr/is not a PostgreSQL backend process|could not cancel the query/,
	'cancel: no failed cancel in the coordinator log');

ok(PeerpoolFleet::wait_for_health($coord, "bool_and(state = 'healthy')", 20),
	'every node healthy after the cancels');
is( $coord->safe_psql('postgres',
		q{SELECT * FROM peerpool.pool_query('SELECT ''works''', 'bnc') AS t(a text)}),
	'works', 'bnc answers after the cancels');

# ---------------------------------------------------------------------------------------
# Session reset in transaction mode

my $probe = q{SELECT current_setting('search_path') AS sp,
       to_regclass('pg_temp.leftover') IS NULL AS no_temp,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks};
my $plant = q{SET search_path = evil, public; CREATE TEMP TABLE leftover (i int); SELECT pg_advisory_lock(7); SELECT pg_sleep(1)};
my $clean = '"$user", public|t|0';

# Sequential calls on one node: the next call sees nothing of the previous one.
sub sequential_clean
{
	my ($node) = @_;
	$coord->safe_psql('postgres', sprintf(
		q{SELECT * FROM peerpool.pool_query(%s, '%s') AS t(a text)}, PeerpoolFleet::quote($plant), $node));
	return $coord->safe_psql('postgres', sprintf(
		q{SELECT * FROM peerpool.pool_query(%s, '%s') AS t(sp text, no_temp boolean, locks int)},
		PeerpoolFleet::quote($probe), $node));
}

# A call that waits in pgbouncer's queue for the only server (node bnc1: pool_size = 1, two
# pg_peerpool connections) while another call dirties that server: what does it see?
sub queued_probe
{
	my $planter = PeerpoolFleet::psql_start($coord,
		[ sprintf(q{SELECT * FROM peerpool.pool_query(%s, 'bnc1') AS t(a text)}, PeerpoolFleet::quote($plant)) ]);
	ok(PeerpoolFleet::wait_until($peer,
			q{SELECT count(*) = 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SET search_path = evil%'},
			timeout => 20),
		'the planting call runs');
	my $prober = PeerpoolFleet::psql_start($coord,
		[ sprintf(q{SELECT * FROM peerpool.pool_query(%s, 'bnc1') AS t(sp text, no_temp boolean, locks int)},
			PeerpoolFleet::quote($probe)) ]);
	my ($r1, $o1, $e1) = PeerpoolFleet::psql_finish($planter);
	my ($r2, $o2, $e2) = PeerpoolFleet::psql_finish($prober);
	is($r1 + $r2, 0, 'both calls succeeded') or diag "$e1\n$e2";
	chomp $o2;
	return $o2;
}

# Health checks would queue in pgbouncer too (they are immune to session state: t/031); stop
# them so that the probing call is the one waiting for the server.
PeerpoolFleet::set_gucs($coord, 'peerpool.health_check_interval' => '1h');
ok( PeerpoolFleet::wait_until($coord,
		"SELECT bool_and(last_check < now() - interval '1 s') FROM peerpool.node_health", timeout => 30),
	'health checks paused');

# 1. The defaults: peerpool.reset_query = 'DISCARD ALL', pgbouncer server_reset_query_always = 0.
is(sequential_clean('bnc'), $clean, 'defaults: a later call sees nothing of the previous one');
my $queued = queued_probe();
note "defaults: a call queued in pgbouncer behind a dirtying call saw: $queued";
like($queued, qr/^evil, public\|f\|1$/,
	'defaults: a call queued in pgbouncer gets the server the previous call dirtied (its DISCARD ALL comes later)');
unlike(slurp_file($coord->logfile), qr/discarding a connection: peerpool\.reset_query failed/,
	'defaults: DISCARD ALL through pgbouncer never failed');
$coord->safe_psql('postgres', q{SELECT * FROM peerpool.pool_query('SELECT pg_advisory_unlock_all()', 'bnc1') AS t(a text)});

# 2. The documented setup: server_reset_query_always = 1, then also peerpool.reset_query = ''.
write_bouncer_ini(reset_always => 1);
kill 'HUP', $bouncer_pid;
$deadline = time + 20;
usleep(100_000) until bouncer_admin('SHOW CONFIG') =~ /^server_reset_query_always\|1\|/m || time > $deadline;
like(bouncer_admin('SHOW CONFIG'), qr/^server_reset_query_always\|1\|/m, 'pgbouncer: server_reset_query_always = 1');
for my $reset ('DISCARD ALL', '')
{
	PeerpoolFleet::set_gucs($coord, 'peerpool.reset_query' => $reset);
	ok(PeerpoolFleet::wait_until($coord, "SELECT current_setting('peerpool.reset_query') = '$reset'"),
		"reset_query = '$reset' applied");
	is(sequential_clean('bnc'), $clean, "server_reset_query_always, reset_query '$reset': a later call sees nothing of the previous one");
	is(queued_probe(), $clean, "server_reset_query_always, reset_query '$reset': nor does a call queued behind it");
}
is( $coord->safe_psql('postgres',
		"SELECT string_agg(state, ',') FROM peerpool.node_health"),
	'healthy,healthy,healthy,healthy', 'every node still healthy');

my @log = split /^/, slurp_file("$dir/pgbouncer.log");
note "pgbouncer log ($dir/pgbouncer.log), last lines:\n" . join('', @log[ ($#log > 5 ? $#log - 5 : 0) .. $#log ]);
ok(stop_bouncer(), "pgbouncer (pid $bouncer_pid) stopped");
done_testing();
