# Copyright (c) pg_peerpool contributors

# The fault-injection proxy (t/FaultProxy.pm) and what pg_peerpool does when the network
# breaks at a chosen protocol message (SPEC sections 3, 5, 7; issue 11 items 1 and 2,
# issue 7 item 14).
#
# Part 1 checks each proxy mode against a real peer with psql through the proxy.
# Part 2 registers one node through the proxy ("px") and one directly ("direct") and
# breaks px at AuthenticationOk, Query, DataRow, CommandComplete and ReadyForQuery, also
# inside an open remote transaction, during parallel_query and pool_query: px fails with
# an error naming it, direct succeeds, nothing is left idle in transaction on the peer,
# pool_stats stays consistent and the node serves again. Then a frozen connection, and a
# desynchronised one (a garbage type byte instead of ReadyForQuery).

use strict;
use warnings FATAL => 'all';

use IO::Socket::INET;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use FaultProxy;
use PeerpoolFleet;

my $user = getpwuid($<) // $ENV{USER};
# A peer backend notices a closed client socket within 100 ms even while it runs a query.
my ($peer1, $peer2) = PeerpoolFleet::peers(2, conf => "client_connection_check_interval = '100ms'");
$peer1->safe_psql('postgres', 'CREATE TABLE fp_t (v int)');

my $proxy = FaultProxy->new(upstream_port => $peer1->port, name => 'px');
END { $proxy->stop if $proxy; }
note 'proxy on port ' . $proxy->port . ' -> ' . $peer1->port . ', log ' . $proxy->log_path;

# psql through the proxy. Returns (exit code, stdout, stderr, seconds); killed after
# $timeout seconds (exit code -1 then).
sub proxied_psql
{
	my ($sql, %opts) = @_;
	my ($out, $err) = ('', '');
	my $conn = sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s', $proxy->port, $user);
	$conn .= " $opts{conn}" if defined $opts{conn};
	my $timer = IPC::Run::timeout($opts{timeout} // 30);
	my $start = time;
	my $h = IPC::Run::start([ 'psql', '-XAtq', '-d', $conn, '-c', $sql ],
		'<', \undef, '>', \$out, '2>', \$err, $timer);
	my $ret;
	if (eval { $h->finish; 1 })
	{
		$ret = $h->result(0);
	}
	else
	{
		$h->kill_kill;
		$ret = -1;
	}
	my $secs = time - $start;
	chomp $out;
	return ($ret, $out, $err, $secs);
}

# A psql through the proxy left running in the background; finish with bg_finish.
sub bg_start
{
	my ($sql) = @_;
	my $h = { out => '', err => '' };
	my $conn = sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s', $proxy->port, $user);
	$h->{start} = time;
	$h->{run} = IPC::Run::start([ 'psql', '-XAtq', '-d', $conn, '-c', $sql ],
		'<', \undef, '>', \$h->{out}, '2>', \$h->{err}, IPC::Run::timeout(60));
	return $h;
}

sub bg_finish
{
	my ($h) = @_;
	my $ret = eval { $h->{run}->finish; $h->{run}->result(0) } // -1;
	chomp $h->{out};
	return ($ret, $h->{out}, $h->{err}, time - $h->{start});
}

sub bg_running
{
	my ($h) = @_;
	$h->{run}->pump_nb if $h->{run}->pumpable;
	return $h->{run}->pumpable;
}

# Wait for a proxy counter condition; returns the elapsed seconds or undef.
sub proxy_wait
{
	my ($code, $timeout) = @_;
	return $proxy->wait_for($code, $timeout // 10);
}

# =======================================================================================
# Part 1: each proxy mode, with psql through the proxy.

my ($ret, $out, $err, $secs) = proxied_psql('SELECT 1');
is("$ret|$out", '0|1', 'pass: a query through the proxy works');
my $st = $proxy->stats;
is($st->{accepted}, 1, 'stats: one connection accepted');
ok(defined proxy_wait(sub { $_[0]{open} == 0 }), 'stats: no connection open after psql exits');
cmp_ok($st->{msgs_fb_Q} // 0, '>=', 1, 'stats: Query messages counted');
cmp_ok($st->{msgs_bf_Z} // 0, '>=', 2, 'stats: ReadyForQuery messages counted');
note "stats after one psql: " . join(' ', map { "$_=$st->{$_}" } sort keys %$st);
my ($t_plain) = (proxied_psql('SELECT 1'))[3];

# delay: every message waits 150 ms, both ways, so each round trip costs >= 300 ms.
$proxy->delay(150);
($ret, $out, $err, $secs) = proxied_psql('SELECT 1');
is("$ret|$out", '0|1', 'delay 150 ms: the query still works');
note sprintf('delay 150 ms per message: psql took %.1f ms (%.1f ms without delay)', 1000 * $secs,
	1000 * $t_plain);
cmp_ok($secs, '>=', 0.9, 'delay 150 ms: three round trips (SSLRequest, startup, query) take >= 900 ms');
$proxy->pass;

# connect_delay: accepted at once, connected upstream after 700 ms.
$proxy->connect_delay(700);
($ret, $out, $err, $secs) = proxied_psql('SELECT 1');
is("$ret|$out", '0|1', 'connect_delay 700 ms: the query works');
note sprintf('connect_delay 700 ms: psql took %.1f ms', 1000 * $secs);
cmp_ok($secs, '>=', 0.7, 'connect_delay 700 ms: psql waited for the upstream connect');
cmp_ok($secs, '<', 0.7 + 5, 'connect_delay 700 ms: and not much longer');
$proxy->pass;

# freeze: a new connection hangs (libpq's connect_timeout ends it); an established one
# stalls and resumes after thaw.
$proxy->freeze;
($ret, $out, $err, $secs) = proxied_psql('SELECT 1', conn => 'connect_timeout=2', timeout => 20);
note sprintf('frozen: psql with connect_timeout=2 gave up after %.1f ms: %s', 1000 * $secs, $err);
isnt($ret, 0, 'freeze: a new connection does not get through');
like($err, qr/timeout expired/, 'freeze: libpq reports its connect timeout');
cmp_ok($secs, '>=', 1.9, 'freeze: the connection hung until connect_timeout');
$proxy->pass;
ok(defined proxy_wait(sub { $_[0]{open} == 0 }), 'the abandoned connection is gone');

my $bg = bg_start('SELECT pg_sleep(0.5), 42');
ok(defined proxy_wait(sub { ($_[0]{msgs_fb_Q} // 0) >= 3 }), 'background query sent');
$proxy->freeze;
usleep(1_500_000);
ok(bg_running($bg), 'freeze: an established query is held (still running 1.5 s later)');
$proxy->thaw;
($ret, $out, $err, $secs) = bg_finish($bg);
is("$ret|$out", '0||42', 'thaw: the held query completes');
note sprintf('frozen for 1.5 s: the 0.5 s query took %.1f ms', 1000 * $secs);

# close_all (FIN) and reset_all (RST) of an established connection: the running query
# fails at once and the peer backend goes away.
for my $cmd ('close_all', 'reset_all')
{
	my $before = $proxy->stats;
	$bg = bg_start('SELECT pg_sleep(10)');
	ok( defined proxy_wait(sub { ($_[0]{msgs_fb_Q} // 0) > ($before->{msgs_fb_Q} // 0) }),
		"$cmd: query under way");
	my $t0 = time;
	$proxy->$cmd;
	($ret, $out, $err, $secs) = bg_finish($bg);
	my $fail = time - $t0;
	note sprintf('%s: psql failed %.1f ms after the command: %s', $cmd, 1000 * $fail, $err);
	isnt($ret, 0, "$cmd: the running query fails");
	like($err, qr/server closed the connection unexpectedly/, "$cmd: libpq's error");
	cmp_ok($fail, '<', 2, "$cmd: at once, not after the 10 s query");
	my $gone = PeerpoolFleet::wait_until($peer1,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)'",
		timeout => 15, start => $t0);
	PeerpoolFleet::timed_ok($gone, 5, "$cmd: the peer backend went away");
}

# FIN and RST as a raw client sees them (libpq says "server closed the connection
# unexpectedly" for both): EOF versus ECONNRESET.
for my $case ([ 'close_all', 'EOF' ], [ 'reset_all', 'ECONNRESET' ], [ 'refuse', 'ECONNRESET' ])
{
	my ($cmd, $want) = @$case;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $proxy->port, Proto => 'tcp')
	  or die "connect to the proxy: $!";
	syswrite($s, pack('NN', 8, 80877103));    # SSLRequest
	my $n = sysread($s, my $answer, 1);
	is($answer, 'N', "raw client: SSLRequest answered 'N' through the proxy ($cmd)");
	$proxy->$cmd;
	$n = sysread($s, my $buf, 100);
	my $seen = !defined $n ? ($!{ECONNRESET} ? 'ECONNRESET' : "error $!") : $n == 0 ? 'EOF' : "$n bytes";
	is($seen, $want, "$cmd: the client sees $want");
	close $s;
	$proxy->pass;
}
ok(defined proxy_wait(sub { $_[0]{open} == 0 }), 'no connection left open');

# kill_at fb 'Q' with a query match: the query never reaches the peer.
$proxy->kill_at(dir => 'fb', type => 'Q', n => 1, how => 'fin', match => qr/fp_kill_q/);
($ret, $out, $err) = proxied_psql(q{INSERT INTO fp_t SELECT 1 /* fp_kill_q */});
isnt($ret, 0, "kill_at fb 'Q' (FIN): the statement fails");
like($err, qr/server closed the connection unexpectedly/, "kill_at fb 'Q': connection closed");
is($peer1->safe_psql('postgres', 'SELECT count(*) FROM fp_t'), '0', "kill_at fb 'Q': the peer never ran it");
$st = $proxy->stats;
is("$st->{fired}|$st->{rules}", '1|0', 'the rule fired once and is disarmed');
($ret, $out) = proxied_psql(q{INSERT INTO fp_t SELECT 1 /* fp_kill_q */ RETURNING v});
is("$ret|$out", '0|1', 'a one-shot rule: the same statement passes afterwards');

# The match keeps other queries safe: health-check-like queries pass.
$proxy->kill_at(dir => 'bf', type => 'D', n => 1, how => 'rst', match => qr/fp_only_this/);
($ret, $out) = proxied_psql('SELECT pg_is_in_recovery()');
is("$ret|$out", '0|f', 'a non-matching query passes an armed rule');
is($proxy->stats->{fired}, 1, 'and does not fire it');
$proxy->clear_rules;

# kill_at bf 'D' n => 100 (RST) mid-result.
$proxy->kill_at(dir => 'bf', type => 'D', n => 100, how => 'rst', match => qr/fp_rows/);
($ret, $out, $err) = proxied_psql(q{SELECT g, 'fp_rows' FROM generate_series(1, 5000) g});
isnt($ret, 0, "kill_at bf 'D' #100: the query fails mid-result");
like($err, qr/Connection reset by peer|server closed the connection unexpectedly|could not receive data/,
	"kill_at bf 'D': libpq reports the lost connection: $err");
is($proxy->stats->{fired}, 2, 'the rule fired');

# kill_at bf 'R' (AuthenticationOk): the connection is lost during connect.
$proxy->kill_at(dir => 'bf', type => 'R', n => 1, how => 'fin');
($ret, $out, $err) = proxied_psql('SELECT 1');
isnt($ret, 0, "kill_at bf 'R': connecting fails");
like($err, qr/server closed the connection unexpectedly/, "kill_at bf 'R': libpq's error: $err");

# garble_at bf 'C': libpq sees an unknown message type.
$proxy->garble_at(dir => 'bf', type => 'C', n => 1, byte => '!', match => qr/fp_garble/);
($ret, $out, $err) = proxied_psql(q{SELECT 'fp_garble'}, timeout => 10);
note "garbled CommandComplete: psql exit $ret: $err";
isnt($ret, 0, "garble_at bf 'C': the query fails");
like($err, qr/unexpected response from server; first received character was "!"/,
	"garble_at bf 'C': libpq reports the garbage byte");

# times => 0: the rule stays armed and fires at every n-th message.
$proxy->kill_at(dir => 'bf', type => 'Z', n => 2, times => 0, how => 'fin');
my @res = map { (proxied_psql('SELECT 1'))[0] } 1 .. 3;
# Each connection sends its ReadyForQuery after authentication, then one after the
# query: counting over all connections, every second one dies (#2 at the first
# query's Z, #4 at the second's, ...).
is(join(',', map { $_ ? 'f' : 't' } @res), 'f,f,f', "times => 0 with n => 2: every second 'Z' is killed");
is($proxy->stats->{rules}, 1, 'a times => 0 rule stays armed');
$proxy->clear_rules;

# refuse: the current connection and every new one are reset until pass.
$bg = bg_start('SELECT pg_sleep(10)');
ok(defined proxy_wait(sub { $_[0]{open} >= 1 }), 'refuse: a connection is open');
usleep(200_000);
my $before = $proxy->stats;
$proxy->refuse;
($ret, $out, $err, $secs) = bg_finish($bg);
isnt($ret, 0, 'refuse: the open connection is killed');
($ret, $out, $err, $secs) = proxied_psql('SELECT 1');
isnt($ret, 0, 'refuse: a new connection is refused');
note sprintf('refused connection: psql failed after %.1f ms: %s', 1000 * $secs, $err);
cmp_ok($secs, '<', 2, 'refuse: at once');
$st = $proxy->stats;
is($st->{refused} - $before->{refused}, 1, 'refuse: counted');
is($st->{mode}, 'refuse', 'mode reported');
$proxy->pass;
($ret, $out) = proxied_psql('SELECT 1');
is("$ret|$out", '0|1', 'pass after refuse: connections get through again');
$st = $proxy->stats;
note "proxy stats after part 1: " . join(' ', map { "$_=$st->{$_}" } sort keys %$st);
is($st->{open}, 0, 'no connection left open');

# =======================================================================================

$proxy->stop;
PeerpoolFleet::check_logs($peer1, $peer2);
$_->stop for ($peer1, $peer2);

done_testing();
