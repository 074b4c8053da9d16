# Copyright (c) pg_peerpool contributors

=pod

=head1 NAME

PeerpoolFleet - build a coordinator and a fleet of peers for pg_peerpool TAP tests

=head1 SYNOPSIS

  use lib 't';
  use PeerpoolFleet;

  my $coord = PeerpoolFleet::coordinator('coord',
      conf => "peerpool.health_check_interval = '200ms'");
  my @peers = PeerpoolFleet::peers(2);
  PeerpoolFleet::register($coord, @peers);
  my $secs = PeerpoolFleet::wait_for_health($coord,
      "count(*) = 2", 10);
  note sprintf('registry applied after %.3f s', $secs);
  PeerpoolFleet::check_logs($coord, @peers);

=head1 DESCRIPTION

Every node is a L<PostgreSQL::Test::Cluster>. The coordinator preloads
pg_peerpool; peers are plain servers that also listen on TCP 127.0.0.1 (the
test framework gives them only a Unix socket by default) so that later tests can
kill, freeze or cut them like a real network peer. Waits poll with a deadline
and return the measured time so that tests can C<note> it.

=cut

package PeerpoolFleet;

use strict;
use warnings FATAL => 'all';

use Carp;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use POSIX ();
use Test::More;
use Time::HiRes qw(time usleep);

# How long a wait may take unless the caller says otherwise (seconds). Generous: it only
# bounds a hang; timing claims are asserted by the tests on the measured value.
our $DEFAULT_TIMEOUT = 30;

# The bgworker's backend_type, as shown in pg_stat_activity.
our $WORKER_TYPE = 'pg_peerpool pool manager';

=pod

=over

=item coordinator($name, %opts)

Init and start a cluster that preloads pg_peerpool. Options:
C<conf> (extra postgresql.conf lines), C<no_preload> (do not preload),
C<no_extension> (do not run CREATE EXTENSION), C<dbname> (database for CREATE
EXTENSION, default C<postgres>). Returns the node.

=cut

sub coordinator
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf',
		"shared_preload_libraries = 'pg_peerpool'")
	  unless $opts{no_preload};
	$node->append_conf('postgresql.conf', $opts{conf}) if defined $opts{conf};
	$node->start;
	$node->safe_psql($opts{dbname} // 'postgres', 'CREATE EXTENSION pg_peerpool')
	  unless $opts{no_extension} || $opts{no_preload};
	return $node;
}

=item peers($n, %opts)

Init and start C<$n> plain clusters named C<< <prefix>1 >> .. C<< <prefix>N >>
(C<prefix> option, default C<peer>), each also listening on 127.0.0.1. Returns
the nodes.

=cut

sub peers
{
	my ($n, %opts) = @_;
	my $prefix = $opts{prefix} // 'peer';
	my @nodes;
	for my $i (1 .. $n)
	{
		my $node = PostgreSQL::Test::Cluster->new("$prefix$i");
		$node->init;
		# With Unix sockets (the default off Windows) Cluster.pm sets
		# listen_addresses = ''; its port is already checked free on 127.0.0.1.
		$node->append_conf('postgresql.conf', "listen_addresses = '127.0.0.1'")
		  if $PostgreSQL::Test::Utils::use_unix_sockets;
		$node->append_conf('postgresql.conf', $opts{conf}) if defined $opts{conf};
		$node->start;
		push @nodes, $node;
	}
	return @nodes;
}

=item streaming_pair()

Start a primary (C<primary>, allows streaming) and a standby (C<standby>)
streaming from it, both also listening on 127.0.0.1. Returns ($primary,
$standby).

=cut

sub streaming_pair
{
	my $primary = PostgreSQL::Test::Cluster->new('primary');
	$primary->init(allows_streaming => 1);
	$primary->append_conf('postgresql.conf', "listen_addresses = '127.0.0.1'")
	  if $PostgreSQL::Test::Utils::use_unix_sockets;
	$primary->start;
	$primary->backup('b');
	my $standby = PostgreSQL::Test::Cluster->new('standby');
	$standby->init_from_backup($primary, 'b', has_streaming => 1);
	$standby->append_conf('postgresql.conf', "listen_addresses = '127.0.0.1'")
	  if $PostgreSQL::Test::Utils::use_unix_sockets;
	$standby->start;
	return ($primary, $standby);
}

=item peer_conninfo($peer)

The conninfo the coordinator uses for a peer: TCP on loopback, database
C<postgres>, as the OS user (initdb -A trust lets it in from 127.0.0.1).

=cut

sub peer_conninfo
{
	my ($peer) = @_;
	my $user = getpwuid($<) // $ENV{USER};
	return sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s',
		$peer->port, $user);
}

=item register($coord, @peers) / register($coord, { dbname => ..., sql_extra => ... }, @peers)

C<SELECT peerpool.pool_add_node(name, conninfo)> for each peer, in its own
transaction, with the peer's cluster name as node_name. An optional leading
hashref gives the database (default C<postgres>) and extra named arguments
appended to the call (e.g. C<"enabled => false">).

=cut

sub register
{
	my ($coord, @rest) = @_;
	my %opts = ref $rest[0] eq 'HASH' ? %{ shift @rest } : ();
	my $extra = defined $opts{sql_extra} ? ", $opts{sql_extra}" : '';
	for my $peer (@rest)
	{
		$coord->safe_psql($opts{dbname} // 'postgres',
			sprintf("SELECT peerpool.pool_add_node(%s, %s%s)",
				quote($peer->name), quote(peer_conninfo($peer)), $extra));
	}
	return;
}

=item quote($text)

A SQL string literal.

=cut

sub quote
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

=item wait_until($node, $query, %opts)

Run C<$query> (which must return one boolean) every 10 ms until it returns
true, with a deadline. Errors (e.g. during a restart or crash recovery) count as
"not yet". Options: C<timeout> seconds (default $DEFAULT_TIMEOUT), C<dbname>
(default C<postgres>), C<start> (a Time::HiRes time to measure from; default:
now). Returns the elapsed seconds, or undef on timeout (after a C<diag> of the
last output). The measured time includes at most one psql round trip of polling
overhead.

=cut

sub wait_until
{
	my ($node, $query, %opts) = @_;
	my $start    = $opts{start} // time;
	my $deadline = time + ($opts{timeout} // $DEFAULT_TIMEOUT);
	my ($out, $err) = ('', '');
	while (1)
	{
		my $remaining = $deadline - time;
		last if $remaining <= 0;
		my $timed_out;
		$node->psql(
			$opts{dbname} // 'postgres', $query,
			stdout => \$out,
			stderr => \$err,
			timeout => $remaining < 1 ? 1 : $remaining,
			timed_out => \$timed_out);
		return time - $start if !$timed_out && $out eq 't';
		usleep(10_000);
	}
	diag "wait_until timed out on node " . $node->name . ":\n$query\n"
	  . "last stdout: $out\nlast stderr: $err";
	return undef;
}

=item wait_for_health($node, $condition, $timeout_s, %opts)

C<wait_until> on C<SELECT $condition FROM peerpool.node_health>, where
C<$condition> is an aggregate boolean expression over the view, for example
C<"count(*) FILTER (WHERE node_name = 'peer1') = 1">. Same options and return
value as C<wait_until>.

=cut

sub wait_for_health
{
	my ($node, $condition, $timeout, %opts) = @_;
	return wait_until($node,
		"SELECT coalesce(($condition), false) FROM peerpool.node_health",
		%opts, (defined $timeout ? (timeout => $timeout) : ()));
}

=item timed_ok($elapsed, $limit_s, $what)

Test that a wait (the return value of C<wait_until>/C<wait_for_health>) finished
and took less than C<$limit_s> seconds, and C<note> the measured time.

=cut

sub timed_ok
{
	my ($elapsed, $limit, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	ok(defined $elapsed, "$what: seen before the deadline");
	note sprintf('%s: measured %.1f ms', $what, 1000 * ($elapsed // 0));
	return cmp_ok($elapsed // 9**9**9, '<', $limit, "$what: within $limit s");
}

=item session($node, %opts)

A L<PostgreSQL::Test::BackgroundPsql> session on C<$node> (C<dbname> option,
default C<postgres>) prepared for C<timed_change>: it holds a temporary function
that polls a condition inside the server every millisecond, so a wait costs one
round trip instead of one psql start per poll. Call C<< $session->quit >> when
done. It does not survive a restart or crash of the server.

=cut

sub session
{
	my ($node, %opts) = @_;
	my $s = $node->background_psql($opts{dbname} // 'postgres');
	# The loop runs in one transaction, so it may only poll what is read afresh on each
	# call, like node_health (shared memory); not pg_stat_activity (a per-transaction
	# snapshot).
	$s->query_safe(q{
CREATE FUNCTION pg_temp.peerpool_wait(cond text, timeout_s float8) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
    done boolean;
BEGIN
    LOOP
        EXECUTE cond INTO done;
        IF done THEN RETURN true; END IF;
        IF clock_timestamp() > deadline THEN RETURN false; END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
END $$});
	return $s;
}

=item timed_change($session, $sql, $condition, $timeout_s)

Run C<$sql> in the C<session> (autocommit, so it has committed when the call
returns), then wait until C<$condition> (an aggregate boolean expression over
peerpool.node_health, as for C<wait_for_health>) holds, polling inside the
server. Returns the seconds from the return of C<$sql> to the condition seen
(Time::HiRes, so within about a millisecond), or undef after C<$timeout_s>
(default $DEFAULT_TIMEOUT).

=cut

sub timed_change
{
	my ($session, $sql, $condition, $timeout) = @_;
	$timeout //= $DEFAULT_TIMEOUT;
	$session->query_safe($sql);
	my $start = time;
	my $ok = $session->query_safe(
		sprintf('SELECT pg_temp.peerpool_wait(%s, %s)',
			quote("SELECT coalesce(($condition), false) FROM peerpool.node_health"),
			$timeout));
	my $elapsed = time - $start;
	if ($ok ne 't')
	{
		diag "timed_change: condition not met after ${timeout}s: $condition";
		return undef;
	}
	return $elapsed;
}

=item health_names($node, %opts)

The node names in peerpool.node_health, sorted, as a list (C<dbname> option).

=cut

sub health_names
{
	my ($node, %opts) = @_;
	my $out = $node->safe_psql($opts{dbname} // 'postgres',
		'SELECT node_name FROM peerpool.node_health ORDER BY node_name');
	return grep { $_ ne '' } split /\n/, $out;
}

=item worker_pids($node)

The pids of pool manager workers in pg_stat_activity (any database), as a list.

=cut

sub worker_pids
{
	my ($node) = @_;
	my $out = $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = '$WORKER_TYPE' ORDER BY pid");
	return grep { $_ ne '' } split /\n/, $out;
}

=item check_logs(@nodes [, { killed_pids => [...] }])

Assert that no node's server log contains "PANIC" or "terminated by signal", nor a
line where the pool manager's loop reports that its bookkeeping missed a node or a
socket ("pg_peerpool: internal:").
With C<killed_pids>, a "terminated by signal" line is allowed when it names one
of those pids (processes the test killed on purpose), and only then.

=cut

sub check_logs
{
	my @nodes = @_;
	my %opts = ref $nodes[-1] eq 'HASH' ? %{ pop @nodes } : ();
	my %killed = map { $_ => 1 } @{ $opts{killed_pids} // [] };
	local $Test::Builder::Level = $Test::Builder::Level + 1;

	for my $node (@nodes)
	{
		my $name = $node->name;
		my $log  = slurp_file($node->logfile);
		my @panic = grep { /PANIC/ } split /\n/, $log;
		is(join("\n", @panic), '', "$name: no PANIC in the server log");
		my @signal = grep {
			/terminated by signal/
			  && !(/\(PID (\d+)\)/ && $killed{$1})
		} split /\n/, $log;
		is(join("\n", @signal), '',
			"$name: no unexpected 'terminated by signal' in the server log");
		# The pool manager's loop verifies its own bookkeeping every second (nodes it must
		# manage, sockets it must watch) and logs what it finds it missed.
		my @internal = grep { /pg_peerpool: internal:/ } split /\n/, $log;
		is(join("\n", @internal), '', "$name: the pool manager's loop missed nothing");
	}
	return;
}

=item log_since($node, $offset)

The server log from byte C<$offset> (take it with C<-s $node-E<gt>logfile>).

=cut

sub log_since
{
	my ($node, $offset) = @_;
	return slurp_file($node->logfile, $offset);
}

=item psql_error($node, $sql, %opts)

Run SQL that is expected to fail, with C<VERBOSITY verbose> so that stderr
carries the SQLSTATE, detail, hint and context. Returns (psql exit code,
stderr). C<dbname> option (default C<postgres>).

=cut

sub psql_error
{
	my ($node, $sql, %opts) = @_;
	my ($out, $err) = ('', '');
	my $ret = $node->psql($opts{dbname} // 'postgres',
		"\\set VERBOSITY verbose\n$sql",
		stdout => \$out,
		stderr => \$err);
	return ($ret, $err);
}

=item set_gucs($node, name => value, ...)

C<ALTER SYSTEM SET> each setting (C<ALTER SYSTEM RESET> for an undef value),
then C<pg_reload_conf()>. The reload is asynchronous: processes apply it when
they next handle SIGHUP.

=cut

sub set_gucs
{
	my ($node, %gucs) = @_;
	my $sql = '';
	for my $name (sort keys %gucs)
	{
		$sql .= defined $gucs{$name}
		  ? "ALTER SYSTEM SET $name = " . quote($gucs{$name}) . ";\n"
		  : "ALTER SYSTEM RESET $name;\n";
	}
	$node->safe_psql('postgres', $sql . 'SELECT pg_reload_conf();');
	return;
}

=item remote_sessions($peer, %opts) / remote_pids($peer, %opts)

The number (resp. the sorted pids) of sessions on C<$peer> whose
application_name is C<application_name> (default C<pg_peerpool>, the
default of C<peerpool.application_name>): the pool manager's connections as the
peer sees them.

=cut

sub remote_sessions
{
	my ($peer, %opts) = @_;
	return $peer->safe_psql('postgres',
		'SELECT count(*) FROM pg_stat_activity WHERE application_name = '
		  . quote($opts{application_name} // 'pg_peerpool'));
}

sub remote_pids
{
	my ($peer, %opts) = @_;
	my $out = $peer->safe_psql('postgres',
		'SELECT pid FROM pg_stat_activity WHERE application_name = '
		  . quote($opts{application_name} // 'pg_peerpool')
		  . ' ORDER BY pid');
	return grep { $_ ne '' } split /\n/, $out;
}

=item events($node, $node_name, %opts)

The rows of peerpool.events for C<$node_name>, oldest first (the view lists the
most recent first; its own order is kept, so events with equal timestamps stay in
ring order). Each is a hashref with C<at> (text), C<at_epoch> (seconds since the
Unix epoch, like Time::HiRes C<time>), C<from>, C<to> and C<reason>. Option
C<since>: only events after this Time::HiRes time.

=cut

sub events
{
	my ($node, $node_name, %opts) = @_;
	my $since =
	  defined $opts{since}
	  ? sprintf(' AND at > to_timestamp(%.6f)', $opts{since})
	  : '';
	my $out = $node->safe_psql(
		$opts{dbname} // 'postgres',
		sprintf(
			q{SELECT n, extract(epoch FROM at), at, from_state, to_state, reason
  FROM (SELECT row_number() OVER () AS n, e.* FROM peerpool.events e) s
 WHERE node_name = %s%s
 ORDER BY n DESC}, quote($node_name), $since));
	my @events;
	for my $line (split /\n/, $out)
	{
		next if $line eq '';
		my (undef, $epoch, $at, $from, $to, $reason) = split /\|/, $line, 6;
		push @events,
		  {
			at_epoch => $epoch + 0,
			at       => $at,
			from     => $from,
			to       => $to,
			reason   => $reason // ''
		  };
	}
	return @events;
}

=item transitions(@events)

The C<from-E<gt>to> strings of C<events> rows, for is_deeply.

=cut

sub transitions
{
	return map { "$_->{from}->$_->{to}" } @_;
}

=item watch_start($session, $query, $timeout_s) / watch_finish($session)

Start polling C<$query> (a SELECT returning one boolean) inside the server in
a C<session>, every millisecond, without waiting for it; do something (stop a
peer...); then C<watch_finish> waits for the poll and returns the Time::HiRes
time (server clock_timestamp, same host clock) at which the condition was first
seen true, or undef after C<$timeout_s> (default $DEFAULT_TIMEOUT). The poll may
start a little after C<watch_start> returns, which can only make a measured
delay longer, never shorter.

=cut

# Runs $select in $session without waiting for it. $create (a CREATE FUNCTION in pg_temp
# named $function) runs once per session first. The output is kept under $key for
# background_finish.
sub background_start
{
	my ($session, $function, $create, $key, $select) = @_;
	if (!$session->{"peerpool_fn_$function"})
	{
		$session->query_safe($create);
		$session->{"peerpool_fn_$function"} = 1;
	}
	my $marker = "peerpool_${key}_started";
	my $out = $session->query_until(qr/$marker\r?\n/, "\\echo $marker\n$select\n");
	$out =~ s/^.*$marker\r?\n//s;
	$session->{"peerpool_out_$key"} = $out;
	return;
}

# Waits for what background_start ran under $key; returns all of its output.
sub background_finish
{
	my ($session, $key) = @_;
	return (delete $session->{"peerpool_out_$key"} // '') . $session->query('');
}

# The poll behind watch_start and stat_watch_start; fresh_stats clears the statistics
# snapshot before each evaluation.
my $SEEN_AT_FUNCTION = q{
CREATE FUNCTION pg_temp.peerpool_seen_at(q text, timeout_s float8, fresh_stats boolean)
RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
    done boolean;
BEGIN
    LOOP
        IF fresh_stats THEN PERFORM pg_stat_clear_snapshot(); END IF;
        EXECUTE q INTO done;
        IF coalesce(done, false) THEN RETURN extract(epoch FROM clock_timestamp()); END IF;
        IF clock_timestamp() > deadline THEN RETURN NULL; END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
END $$};

sub watch_start
{
	my ($session, $query, $timeout, $fresh_stats) = @_;
	$timeout //= $DEFAULT_TIMEOUT;
	background_start($session, 'peerpool_seen_at', $SEEN_AT_FUNCTION, 'watch',
		sprintf('SELECT pg_temp.peerpool_seen_at(%s, %s, %s);',
			quote($query), $timeout, $fresh_stats ? 'true' : 'false'));
	return;
}

sub watch_finish
{
	my ($session) = @_;
	my ($seen) = grep { /\S/ } split /\r?\n/, background_finish($session, 'watch');
	return defined $seen ? $seen + 0 : undef;
}

=item child_pids($pid)

The pids of the direct children of process C<$pid> (from /proc; Linux).

=cut

sub child_pids
{
	my ($ppid) = @_;
	my @kids;
	opendir(my $dh, '/proc') or croak "cannot read /proc: $!";
	for my $pid (grep { /^\d+$/ } readdir $dh)
	{
		open(my $fh, '<', "/proc/$pid/stat") or next;
		my $stat = <$fh> // '';
		close $fh;
		# pid (comm) state ppid ...; comm may contain spaces and parentheses.
		push @kids, $pid if $stat =~ /\)\s+\S+\s+(\d+)\s/ && $1 == $ppid;
	}
	closedir $dh;
	return sort { $a <=> $b } @kids;
}

=item freeze($node) / thaw(@pids)

C<freeze> sends SIGSTOP to the postmaster of C<$node> (a cluster this test
started), then to each of its children, so that the whole server is frozen but
its sockets stay open (a peer that hangs without sending RST). Returns the pids
it stopped; pass them to C<thaw> (SIGCONT). Tests should thaw in an END block
too, so that a failed test does not leave a frozen server behind.

=cut

sub freeze
{
	my ($node) = @_;
	my $postmaster = $node->{_pid};
	croak 'node ' . $node->name . ' is not running' unless defined $postmaster;
	kill('STOP', $postmaster) == 1 or croak "SIGSTOP $postmaster failed: $!";
	# The postmaster is stopped, so it forks no new children while we list them.
	my @kids = child_pids($postmaster);
	kill('STOP', @kids) if @kids;
	return ($postmaster, @kids);
}

sub thaw
{
	my @pids = @_;
	kill('CONT', reverse @pids) if @pids;
	return;
}

=item tcp_clients_to(@ports)

The number of TCP sockets on this host (IPv4 and IPv6, from /proc/net) that
are connecting or connected to one of C<@ports> as a client (remote port in
C<@ports>, local port not), in one pass: a near-atomic count of the pool
manager's connections to its peers, including those still being opened (the
test framework's own psql sessions use Unix sockets).

=cut

sub tcp_clients_to
{
	my %want = map { $_ => 1 } @_;
	my %seen;    # /proc/net/tcp is read in chunks resumed by position: while other sockets
	             # come and go, one socket can be listed twice. Count each inode once.
	my $n = 0;
	for my $file ('/proc/net/tcp', '/proc/net/tcp6')
	{
		open(my $fh, '<', $file) or next;
		my $text = do { local $/; <$fh> };
		close $fh;
		for my $line (split /\n/, $text)
		{
			my @f = split ' ', $line;
			next unless @f > 3 && $f[1] =~ /:([0-9A-Fa-f]{4})$/;
			my $lport = hex $1;
			next unless $f[2] =~ /:([0-9A-Fa-f]{4})$/;
			my $rport = hex $1;
			# 01 ESTABLISHED, 02 SYN_SENT
			$n++
			  if $want{$rport}
			  && !$want{$lport}
			  && ($f[3] eq '01' || $f[3] eq '02')
			  && !$seen{"$f[1] $f[9]"}++;
		}
	}
	return $n;
}

=item timed_psql($node, $sql, %opts)

Run C<$sql> with C<safe_psql> and measure it with Time::HiRes (psql start-up
included). Returns (seconds, stdout). C<dbname> option (default C<postgres>).

=cut

sub timed_psql
{
	my ($node, $sql, %opts) = @_;
	my $start = time;
	my $out = $node->safe_psql($opts{dbname} // 'postgres', $sql);
	return (time - $start, $out);
}

=item psql_start($node, \@commands, %opts) / psql_finish($handle, %opts)

Start psql in the background (IPC::Run) with one C<-c> per command, without
waiting for it: a caller whose statement a test cancels, terminates or runs
concurrently with others. Options: C<application_name> (so the test can find
the backend in pg_stat_activity), C<dbname> (default C<postgres>). psql runs
with C<VERBOSITY verbose>, so errors carry their SQLSTATE. C<psql_finish> waits
for it (C<timeout> option, seconds, default $DEFAULT_TIMEOUT; killed after
that) and returns (exit code, stdout, stderr); the handle also records
C<started> and C<finished> (Time::HiRes times).

=cut

sub psql_start
{
	my ($node, $commands, %opts) = @_;
	my $h = { out => '', err => '' };
	my $connstr = $node->connstr($opts{dbname} // 'postgres');
	$connstr .= ' application_name=' . $opts{application_name}
	  if defined $opts{application_name};
	$h->{timer} = IPC::Run::timer($opts{timeout} // $DEFAULT_TIMEOUT);
	$h->{started} = time;
	$h->{run} = IPC::Run::start(
		[
			$node->installed_command('psql'), '-XAtq', '-v', 'VERBOSITY=verbose',
			'-d', $connstr, map { ('-c', $_) } @$commands
		],
		'<', \undef, '>', \$h->{out}, '2>', \$h->{err}, $h->{timer});
	return $h;
}

sub psql_finish
{
	my ($h) = @_;
	eval { $h->{run}->finish; 1 } or do
	{
		diag "psql_finish: $@";
		$h->{run}->kill_kill;
	};
	$h->{finished} //= time;
	# The wait status of psql: its exit code, or -1 if it was killed by a signal.
	my $status = $h->{run}->full_result(0);
	my $ret = !defined $status || ($status & 127) ? -1 : $status >> 8;
	return ($ret, $h->{out}, $h->{err});
}

=item psql_running($handle)

Whether a C<psql_start> process still runs (pumps its output without waiting).
Records C<finished> the first time it is seen done.

=cut

sub psql_running
{
	my ($h) = @_;
	return 0 if defined $h->{finished};
	$h->{run}->pump_nb if $h->{run}->pumpable;
	return 1 if $h->{run}->pumpable;
	$h->{finished} = time;
	return 0;
}

=item stat_watch_start($session, $query, $timeout_s)

Like C<watch_start> (finish with C<watch_finish>), but the poll clears the
statistics snapshot before each evaluation (C<pg_stat_clear_snapshot()>), so
C<$query> may read C<pg_stat_activity> afresh on every poll. For a session on a
peer: watch its remote sessions appear or go away.

=cut

sub stat_watch_start
{
	my ($session, $query, $timeout) = @_;
	return watch_start($session, $query, $timeout, 1);
}

=item stat_lifetime_start($session, $query, $timeout_s) / stat_lifetime_finish($session)

Watch, inside the server and with a fresh statistics snapshot on every poll
(every millisecond), for C<$query> (one boolean, e.g. "a remote query of ours is
active") to become true and then false again, without waiting. Start it, do
something that makes the thing appear (and go away), then C<stat_lifetime_finish>
waits and returns (appeared, gone) as Time::HiRes times (server clock, same host),
either undef if not seen within C<$timeout_s> (default $DEFAULT_TIMEOUT).

=cut

sub stat_lifetime_start
{
	my ($session, $query, $timeout) = @_;
	$timeout //= $DEFAULT_TIMEOUT;
	background_start($session, 'peerpool_stat_lifetime', q{
CREATE FUNCTION pg_temp.peerpool_stat_lifetime(q text, timeout_s float8,
    OUT appeared float8, OUT gone float8)
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
    present boolean;
BEGIN
    LOOP
        PERFORM pg_stat_clear_snapshot();
        EXECUTE q INTO present;
        IF appeared IS NULL AND coalesce(present, false) THEN
            appeared := extract(epoch FROM clock_timestamp());
        ELSIF appeared IS NOT NULL AND NOT coalesce(present, false) THEN
            gone := extract(epoch FROM clock_timestamp());
            RETURN;
        END IF;
        IF clock_timestamp() > deadline THEN RETURN; END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
END $$}, 'lifetime',
		sprintf('SELECT appeared, gone FROM pg_temp.peerpool_stat_lifetime(%s, %s);',
			quote($query), $timeout));
	return;
}

sub stat_lifetime_finish
{
	my ($session) = @_;
	my ($line) = grep { /\|/ } split /\r?\n/, background_finish($session, 'lifetime');
	my ($appeared, $gone) = split /\|/, ($line // '|'), -1;
	return (
		(defined $appeared && $appeared ne '' ? $appeared + 0 : undef),
		(defined $gone     && $gone ne ''     ? $gone + 0     : undef));
}

=item stat_sample_start($session, $query, $duration_s) / stat_sample_finish($session)

Evaluate C<$query> (one integer, e.g. a count over pg_stat_activity) every
millisecond for C<$duration_s> seconds inside the server, with a fresh
statistics snapshot each time, without waiting; C<stat_sample_finish> waits and
returns (maximum, number of samples).

=cut

sub stat_sample_start
{
	my ($session, $query, $duration) = @_;
	background_start($session, 'peerpool_stat_max', q{
CREATE FUNCTION pg_temp.peerpool_stat_max(q text, secs float8, OUT max_value bigint, OUT samples bigint)
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => secs);
    v bigint;
BEGIN
    max_value := NULL;
    samples := 0;
    WHILE clock_timestamp() < deadline LOOP
        PERFORM pg_stat_clear_snapshot();
        EXECUTE q INTO v;
        samples := samples + 1;
        IF max_value IS NULL OR v > max_value THEN max_value := v; END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
END $$}, 'sample',
		sprintf('SELECT max_value, samples FROM pg_temp.peerpool_stat_max(%s, %s);',
			quote($query), $duration));
	return;
}

sub stat_sample_finish
{
	my ($session) = @_;
	my ($line) = grep { /\S/ } split /\r?\n/, background_finish($session, 'sample');
	return split /\|/, ($line // '|');
}


=item proc_cpu_seconds($pid)

User plus system CPU time a process has used so far, in seconds, from
/proc/$pid/stat (Linux); 0 if the process is gone.

=cut

sub proc_cpu_seconds
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/stat") or return 0;
	my $stat = <$fh>;
	close $fh;
	$stat =~ s/^.*\)\s+//s;    # after "pid (comm) "
	my @f = split ' ', $stat;
	# fields 14 and 15 of stat (utime, stime), counted from "state" = 0
	return ($f[11] + $f[12]) / POSIX::sysconf(POSIX::_SC_CLK_TCK());
}

=item proc_memory_kb($pid)

C<VmRSS> and C<VmHWM> (peak RSS) of a process in kB, from /proc (Linux), as a
hashref C<{ rss =E<gt> ..., hwm =E<gt> ... }>.

=cut

sub proc_memory_kb
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/status") or croak "cannot read /proc/$pid/status: $!";
	my %mem;
	while (my $line = <$fh>)
	{
		$mem{rss} = $1 if $line =~ /^VmRSS:\s+(\d+)\s+kB/;
		$mem{hwm} = $1 if $line =~ /^VmHWM:\s+(\d+)\s+kB/;
	}
	close $fh;
	return \%mem;
}

=back

=cut

1;
