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
$_->safe_psql('postgres', 'CREATE TABLE fp_t (v int)') for ($peer1, $peer2);

my $proxy = FaultProxy->new(upstream_port => $peer1->port, name => 'px');
END { $proxy->stop if $proxy; }
note 'proxy on port ' . $proxy->port . ' -> ' . $peer1->port . ', log ' . $proxy->log_path;

# psql through the proxy. Returns (exit code, stdout, stderr, seconds); killed after
# $timeout seconds (exit code -1 then).
sub proxied_psql
{
	my ($sql, %opts) = @_;
	my ($out, $err) = ('', '');
	my $conn = $proxy->conninfo($user);
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
	my $conn = $proxy->conninfo($user);
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
# Part 2: pg_peerpool with node "px" through the proxy and node "direct" straight to peer2.
#
# Checks every 500 ms with a 500 ms timeout and a threshold of 2, quick reconnects.

my $max_conn = 3;
my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
peerpool.health_check_timeout = '500ms'
peerpool.unhealthy_threshold = 2
peerpool.healthy_threshold = 1
peerpool.connect_timeout = '2s'
peerpool.reconnect_backoff_initial = '100ms'
peerpool.reconnect_backoff_max = '500ms'
peerpool.acquire_timeout = '5s'
EOC
$proxy->register_pair($coord, $user, $peer2, $max_conn);

sub both_healthy
{
	my ($timeout) = @_;
	return PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE state = 'healthy') = 2", $timeout // 15);
}
PeerpoolFleet::timed_ok(both_healthy(), 10, 'px (through the proxy) and direct are healthy');

# One call, in a psql of its own; returns (seconds, exit code, stdout, stderr).
sub call
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $start = time;
	my $ret = $coord->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		stdout => \$out, stderr => \$err, timeout => 60);
	return (time - $start, $ret, $out, $err);
}

# parallel_query over px and direct: (seconds, { node => { ok, error, ms } }).
sub pq
{
	my ($sql, $extra) = @_;
	my ($secs, $ret, $out, $err) = call(sprintf(
		q{SELECT node_name, success, coalesce(error, ''), round(elapsed_ms::numeric, 1)
  FROM peerpool.parallel_query(%s, ARRAY['px', 'direct']%s)},
		PeerpoolFleet::quote($sql), $extra // ''));
	my %rows;
	for my $line (split /\n/, $out)
	{
		my ($name, $ok, $error, $ms) = split /\|/, $line, 4;
		$rows{$name} = { ok => $ok, error => $error, ms => $ms };
	}
	$rows{call_error} = $err if $ret != 0;
	return ($secs, \%rows);
}

sub px_stats
{
	my $line = $coord->safe_psql('postgres',
		q{SELECT total, active, idle, waiting, created, closed, errors, state FROM peerpool.pool_stats WHERE node_name = 'px'});
	my %s;
	@s{qw(total active idle waiting created closed errors state)} = split /\|/, $line;
	return \%s;
}

my $idle_in_tx = q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_peerpool'
  AND state LIKE 'idle in transaction%'};

# After a fault: nothing of ours idle in transaction on peer1, px's pool back within its
# bounds with nothing active, and px answers again. Returns the seconds until px answered.
sub settled
{
	my ($what, $t0) = @_;
	my $clean = PeerpoolFleet::wait_until($peer1, "SELECT ($idle_in_tx) = 0", timeout => 10);
	ok(defined $clean, "$what: no session of ours left idle in transaction on the peer");
	my $sessions = PeerpoolFleet::remote_sessions($peer1);
	cmp_ok($sessions, '<=', $max_conn, "$what: peer sessions ($sessions) <= max_connections");
	my $stats_ok = PeerpoolFleet::wait_until($coord,
		"SELECT total <= $max_conn AND active = 0 AND total = active + idle FROM peerpool.pool_stats WHERE node_name = 'px'",
		timeout => 10);
	my $st = px_stats();
	ok(defined $stats_ok,
		"$what: pool_stats consistent (total $st->{total} <= $max_conn, active $st->{active} = 0, idle $st->{idle})");
	is(px_stats()->{state}, 'healthy', "$what: px is still healthy (one broken connection is not a node failure)");
	my ($secs, $rows) = pq('SELECT 1');
	is(($rows->{px}{ok} // '?') . ',' . ($rows->{direct}{ok} // '?'), 't,t',
		"$what: the next call succeeds on both nodes at once");
	return;
}

$peer1->safe_psql('postgres', 'TRUNCATE fp_t');
my $many = q{SELECT g, repeat('x', 100) AS pad, '%s' AS marker FROM generate_series(1, 20000) g};

# The fault cases: name, rule, the SQL (with a marker the rule matches), the column
# definition list for pool_query.
my @cases = (
	[ 'Q', { dir => 'fb', type => 'Q' }, q{SELECT 'fp_case_Q' AS m}, 'm text' ],
	[ 'D', { dir => 'bf', type => 'D', n => 500 }, $many, 'g int, pad text, m text' ],
	[ 'C', { dir => 'bf', type => 'C' }, q{SELECT 'fp_case_C' AS m}, 'm text' ],
	[ 'Z', { dir => 'bf', type => 'Z' }, q{SELECT 'fp_case_Z' AS m}, 'm text' ],
	[ 'tx-D', { dir => 'bf', type => 'D' },
		q{BEGIN; INSERT INTO fp_t VALUES (1); SELECT pg_sleep(0.2), 'fp_case_tx-D' AS m}, 's text, m text' ],
	[ 'tx-Z', { dir => 'bf', type => 'Z' },
		q{BEGIN; INSERT INTO fp_t VALUES (2); SELECT pg_sleep(0.2), 'fp_case_tx-Z' AS m}, 's text, m text' ],
);

# parallel_query_rows (SPEC section 5): with on_error => 'warning' (the default) a failed node
# raises a WARNING naming it, none of its rows are returned (not even those it sent before the
# fault), and the other node's rows still are.
#
# parallel_query's errors that do not name the node (its timeout and state errors do).
my @unnamed;
for my $fn ('parallel_query', 'parallel_query_rows', 'pool_query')
{
	for my $how ('rst', 'fin')
	{
		for my $case (@cases)
		{
			my ($point, $rule, $sql, $coldef) = @$case;
			my $tag = "fp_case_$point";
			$sql = sprintf($sql, $tag) if $sql =~ /%s/;
			my $what = "$fn, \u$how at $point";
			ok(both_healthy(), "$what: both nodes healthy first");
			my $before = px_stats();
			my $fired = $proxy->stats->{fired};
			$proxy->kill_at(%$rule, how => $how, match => qr/\Q$tag\E/);
			my ($secs, $rows, $ret, $out, $err);
			if ($fn eq 'parallel_query')
			{
				($secs, $rows) = pq($sql, ', timeout_ms => 10000');
				note sprintf('%s: call took %.1f ms; px: %s %s ms "%s"; direct: %s %s ms', $what, 1000 * $secs,
					map({ $_ // '?' } @{ $rows->{px} // {} }{qw(ok ms error)}),
					map({ $_ // '?' } @{ $rows->{direct} // {} }{qw(ok ms)}));
				is($rows->{px}{ok}, 'f', "$what: px fails");
				push @unnamed, "$what: $rows->{px}{error}" unless ($rows->{px}{error} // '') =~ /node "px"/;
				like($rows->{px}{error} // '', qr/connection|closed|reset/i, "$what: the error says the connection was lost");
				is($rows->{direct}{ok}, 't', "$what: direct succeeds");
			}
			elsif ($fn eq 'parallel_query_rows')
			{
				($secs, $ret, $out, $err) = call(sprintf(
					q{SELECT node_name, count(*) FROM peerpool.parallel_query_rows(%s, ARRAY['px', 'direct'],
  timeout_ms => 10000) AS t(node_name text, %s) GROUP BY node_name ORDER BY node_name},
					PeerpoolFleet::quote($sql), $coldef));
				$err =~ s/\s+$//;
				$out =~ s/\n/, /g;
				note sprintf('%s: call took %.1f ms, exit %d: rows per node: %s; %s', $what, 1000 * $secs, $ret, $out, $err);
				is($ret, 0, "$what: the call succeeds (on_error => 'warning')");
				like($err, qr/WARNING:.*node "px"/, "$what: a WARNING names px");
				like($err, qr/connection|closed|reset/i, "$what: the WARNING says the connection was lost");
				is($out, 'direct|' . ($point eq 'D' ? 20000 : 1), "$what: all of direct's rows, none of px's");
			}
			else
			{
				($secs, $ret, $out, $err) = call(sprintf(
					q{SELECT count(*) FROM peerpool.pool_query(%s, 'px', timeout_ms => 10000) AS t(%s)},
					PeerpoolFleet::quote($sql), $coldef));
				$err =~ s/\s+$//;
				note sprintf('%s: call took %.1f ms, exit %d: %s', $what, 1000 * $secs, $ret, $err);
				isnt($ret, 0, "$what: the call fails");
				like($err, qr/node "px"/, "$what: the error names the node");
				my ($s2, $r2, $o2) = call(q{SELECT * FROM peerpool.pool_query('SELECT 1', 'direct') AS t(a int)});
				is("$r2|$o2", '0|1', "$what: a call to direct succeeds");
			}
			cmp_ok($secs, '<', 3, "$what: the call returns at once, not at its 10 s deadline");
			is($proxy->stats->{fired}, $fired + 1, "$what: the proxy fired the rule once");
			$proxy->clear_rules;
			settled($what);
			my $after = px_stats();
			cmp_ok($after->{closed}, '>', $before->{closed}, "$what: pool_stats counts the broken connection as closed");
		}
	}
}

# ---------------------------------------------------------------------------------------
# AuthenticationOk lost while the pool opens a connection for a call: px's only pooled
# connection is busy, so the call needs a new one, and every new connection is killed at
# its 'R'.

for my $how ('rst', 'fin')
{
	my $what = "parallel_query, \u$how at R (a new pool connection)";
	my $t_case = time;
	$proxy->close_all;
	ok( PeerpoolFleet::wait_until($coord,
			q{SELECT total = 1 AND idle = 1 AND state = 'healthy' FROM peerpool.pool_stats WHERE node_name = 'px'},
			timeout => 15),
		"$what: px back to one idle connection");
	# Armed before the hold: any connection opened from now on (for the call, or for a
	# check while the only connection is busy) dies at its AuthenticationOk.
	my $fired = $proxy->stats->{fired};
	$proxy->kill_at(dir => 'bf', type => 'R', how => $how, times => 0);
	my $hold = PeerpoolFleet::psql_start($coord,
		[q{SELECT * FROM peerpool.pool_query('SELECT pg_sleep(3) /* fp_hold */', 'px') AS t(s text)}]);
	ok( PeerpoolFleet::wait_until($coord,
			q{SELECT active >= 1 OR state <> 'healthy' FROM peerpool.pool_stats WHERE node_name = 'px'}, timeout => 10),
		"$what: px's connection is busy");
	# The deadline (1.5 s) ends before the held connection frees (3 s): px fails whether
	# the pool gives up on the failed connect or waits for a connection.
	my ($secs, $rows) = pq(q{SELECT 'fp_case_R' AS m}, ', timeout_ms => 1500');
	my $st = $proxy->stats;
	$proxy->clear_rules;
	note sprintf('%s: call took %.1f ms; px: %s %s ms "%s"; direct: %s; the proxy killed %d connection(s) at R',
		$what, 1000 * $secs, map({ $_ // '?' } @{ $rows->{px} // {} }{qw(ok ms error)}),
		$rows->{direct}{ok} // '?', $st->{fired} - $fired);
	cmp_ok($st->{fired} - $fired, '>=', 1, "$what: the proxy killed a new connection at 'R'");
	is($rows->{direct}{ok}, 't', "$what: direct succeeds");
	is($rows->{px}{ok}, 'f', "$what: px fails");
	like($rows->{px}{error} // '', qr/node "px"/, "$what: the error names the node");
	cmp_ok($secs, '<', 3, "$what: the call returns by its 1.5 s deadline (+1.5 s)");
	my ($ret, $out, $err) = PeerpoolFleet::psql_finish($hold);
	$err =~ s/\s+$//;
	note "$what: the held pool_query (on the working connection): exit $ret: $out $err";
	note "$what: px events: "
	  . join(', ', map { "$_->{from}->$_->{to} ($_->{reason})" } PeerpoolFleet::events($coord, 'px', since => $t_case));
	ok(PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 2", 15),
		"$what: px healthy again");
	settled($what);
}

# ---------------------------------------------------------------------------------------
# A frozen established connection: the call's deadline holds, direct is not delayed, and
# px leaves healthy within health_check_interval x unhealthy_threshold + health_check_timeout
# (500 ms x 2 + 500 ms = 1.5 s).

{
	ok(both_healthy(), 'frozen: both healthy first');
	my $s = PeerpoolFleet::session($coord);
	PeerpoolFleet::watch_start($s,
		q{SELECT count(*) = 1 FROM peerpool.node_health WHERE node_name = 'px' AND state <> 'healthy'}, 20);
	my $t0 = time;
	$proxy->freeze;
	# The deadline (300 ms) comes before the checks can declare px unhealthy (>= ~800 ms).
	my ($secs, $rows) = pq(q{SELECT 'fp_frozen' AS m}, ', timeout_ms => 300');
	my $left = PeerpoolFleet::watch_finish($s);
	$s->quit;
	note sprintf('frozen: call took %.1f ms; px: %s %s ms "%s"; direct: %s %s ms', 1000 * $secs,
		map({ $_ // '?' } @{ $rows->{px} // {} }{qw(ok ms error)}),
		map({ $_ // '?' } @{ $rows->{direct} // {} }{qw(ok ms)}));
	is("$rows->{px}{ok},$rows->{direct}{ok}", 'f,t', 'frozen: px fails, direct succeeds');
	like($rows->{px}{error}, qr/^timeout: node "px" did not answer within 300 ms \[SQLSTATE 57014\]$/,
		'frozen: px fails with the timeout error');
	cmp_ok($rows->{px}{ms}, '>=', 290, 'frozen: px failed at its deadline, not before');
	cmp_ok($rows->{px}{ms}, '<', 800, 'frozen: px failed at its deadline, not much after');
	cmp_ok($secs, '<', 2, 'frozen: the call returns soon after its 300 ms deadline (psql start-up included)');
	cmp_ok($rows->{direct}{ms}, '<', 500, 'frozen: direct was not held up');
	ok(defined $left, 'frozen: px left healthy');
	note sprintf('frozen: px left healthy %.1f ms after the freeze (bound 1500 ms): %s', 1000 * (($left // 0) - $t0),
		$coord->safe_psql('postgres', q{SELECT state || ': ' || coalesce(last_error, '') FROM peerpool.node_health WHERE node_name = 'px'}));
	cmp_ok(($left // 9**9**9) - $t0, '<', 1.5 + 0.5, 'frozen: within interval x threshold + timeout (1.5 s, +0.5 s slack)');
	my ($d_secs, $d_rows) = pq(q{SELECT 1}, ", timeout_ms => 1000");
	is($d_rows->{direct}{ok}, 't', 'frozen: calls to direct go on');
	$proxy->pass;
	PeerpoolFleet::timed_ok(both_healthy(15), 10, 'thawed: px healthy again');
	settled('frozen, then thawed');
}

# ---------------------------------------------------------------------------------------
# A desynchronised connection (issue 7 item 14): a garbage type byte instead of the
# ReadyForQuery of a caller's query. libpq reports "unexpected response from server" and
# then waits for a ReadyForQuery that never comes. With peerpool.query_timeout = 30s the
# call must fail at once (well under 2 s) and the connection must be discarded.
# Expected to fail on the code of this branch (the call is held until its deadline).

for my $case ([ 'parallel_query', 'Z' ], [ 'pool_query', 'Z' ], [ 'parallel_query', 'D' ])
{
	my ($fn, $type) = @$case;
	my $what = "desync: $fn, garbage instead of '$type'";
	ok(both_healthy(), "$what: both healthy first");
	my $before = px_stats();
	my $tag = "fp_desync_${fn}_$type";
	$proxy->garble_at(dir => 'bf', type => $type, byte => '!', match => qr/\Q$tag\E/);
	my ($secs, $rows, $ret, $out, $err);
	my $prefix = "SET peerpool.query_timeout = '30s';\n";
	if ($fn eq 'parallel_query')
	{
		($secs, $ret, $out, $err) = call($prefix . sprintf(
			q{SELECT node_name, success, coalesce(error, '') FROM peerpool.parallel_query('SELECT ''%s'' AS m', ARRAY['px', 'direct'])},
			$tag));
		note sprintf("%s: call took %.1f ms:\n%s%s", $what, 1000 * $secs, $out, $err);
		like($out, qr/^px\|f\|.*node "px".*\n/m, "$what: px fails with an error naming it");
		like($out, qr/^px\|f\|.*(unexpected|protocol|desynchron)/mi, "$what: the error says what went wrong");
		like($out, qr/^direct\|t\|/m, "$what: direct succeeds");
	}
	else
	{
		($secs, $ret, $out, $err) = call($prefix . sprintf(
			q{SELECT * FROM peerpool.pool_query('SELECT ''%s'' AS m', 'px') AS t(m text)}, $tag));
		note sprintf("%s: call took %.1f ms: exit %d %s%s", $what, 1000 * $secs, $ret, $out, $err);
		isnt($ret, 0, "$what: the call fails");
		like($err, qr/node "px".*(unexpected|protocol|desynchron)/i, "$what: the error names the node and the cause");
	}
	cmp_ok($secs, '<', 2, "$what: at once (under 2 s), not at the 30 s query_timeout");
	is($proxy->stats->{rules}, 0, "$what: the proxy garbled the message");
	my $discarded = PeerpoolFleet::wait_until($coord,
		"SELECT closed > $before->{closed} FROM peerpool.pool_stats WHERE node_name = 'px'", timeout => 5);
	ok(defined $discarded, "$what: the connection is discarded (pool_stats closed grows)");
	$proxy->clear_rules;
	settled($what);
}

# Defect on the current code: a connection lost while a parallel_query runs gives
# "connection lost: server closed ..." without the node's name (pool_query prefixes it,
# and parallel_query's own timeout and state errors name it).
is(join("\n", @unnamed), '', 'parallel_query: every connection-lost error names the node');

is($peer1->safe_psql('postgres', 'SELECT count(*) FROM fp_t'), '0',
	'no INSERT of a killed remote transaction was committed');
is($peer2->safe_psql('postgres', 'SELECT count(*) FROM fp_t'), '0',
	'direct: the transactions the calls left open were rolled back, not committed');

# =======================================================================================

$proxy->stop;
PeerpoolFleet::check_logs($coord, $peer1, $peer2);
$_->stop for ($coord, $peer1, $peer2);

done_testing();
