# Copyright (c) pg_peerpool contributors
#
# Soak driver (issue 11 item 6): a coordinator with pg_peerpool and three peers on loopback, two
# of them behind t/FaultProxy.pm proxies, under a mixed load with random faults for DURATION
# seconds. Run through bench/soak.sh (which sets up the directory, the user and the trap), not
# directly. Not part of CI.
#
#   perl -I t bench/soak.pl WORKDIR
#
# Environment: DURATION (seconds of load, default 1800), PG_CONFIG, SOAK_CLIENTS (query client
# loops, default 4), SOAK_SEED (random seed; printed), SOAK_PORT_BASE (first port tried,
# default 46000; six ports are used: four servers, two proxies, all on 127.0.0.1, each taken
# just before use, upwards up to 46999), SOAK_FAULT_GAP (mean seconds between faults, default 3).

use strict;
use warnings;

use FaultProxy;
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

$| = 1;
my $work = shift @ARGV or die "usage: soak.pl WORKDIR\n";
-d $work && -w $work or die "soak: $work is not a writable directory\n";

my $duration  = $ENV{DURATION}     // 1800;
my $nclients  = $ENV{SOAK_CLIENTS} // 4;
my $seed      = $ENV{SOAK_SEED}    // (time() * 1000 ^ $$) % 1_000_000_007;
my $fault_gap = $ENV{SOAK_FAULT_GAP} // 3;
my $pg_config = $ENV{PG_CONFIG} // '/usr/lib/postgresql/15/bin/pg_config';
chomp(my $bindir = `$pg_config --bindir`);
die "soak: $pg_config --bindir failed\n" unless $bindir && -x "$bindir/postgres";
chomp(my $pkglibdir = `$pg_config --pkglibdir`);
die "soak: pg_peerpool.so is not installed in $pkglibdir (make install PG_CONFIG=...)\n"
  unless -f "$pkglibdir/pg_peerpool.so";
srand($seed);

my $PSQL = "$bindir/psql";
my $APP  = 'peerpool_soak';       # application_name of the pool manager's sessions on the peers
my $MAXC = 4;                      # max_connections of p1 and p2 (p3 is altered between 2 and 6)
my $QT_MS = 5000;                  # timeout_ms of the query calls
my %started_pids;                  # postmaster pid => data directory (for the stop)
my @children;                      # client, registry and health loops
my $parent_pid = $$;

sub logmsg
{
	my @t = gmtime;
	printf "%02d:%02d:%02d %s\n", @t[ 2, 1, 0 ], join('', @_);
}

# ---------------------------------------------------------------------------------------
# Ports and servers

sub port_free
{
	my ($port) = @_;
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
		Proto => 'tcp', Listen => 1, ReuseAddr => 0);
	return 0 unless $s;
	close $s;
	return !-e "$work/.s.PGSQL.$port";
}

# Ports are taken one at a time, just before use, and a start that finds its port taken meanwhile
# (a client's ephemeral port can be any of these) retries on the next one.
my $next_port = $ENV{SOAK_PORT_BASE} // 46000;
my %port;

sub take_port
{
	while ($next_port <= 46999)
	{
		my $p = $next_port++;
		return $p if port_free($p);
	}
	die "soak: no free port left in 46000-46999\n";
}

sub run_cmd
{
	my ($what, @cmd) = @_;
	my $out = `@cmd 2>&1`;
	die "soak: $what failed: @cmd\n$out" if $?;
	return $out;
}

sub init_server
{
	my ($name, $extra) = @_;
	my $dir = "$work/$name";
	run_cmd("initdb $name", "$bindir/initdb", '-D', $dir, '-A', 'trust', '-E', 'UTF8',
		'--locale=C', '--no-sync', '-U', 'postgres');
	open my $fh, '>>', "$dir/postgresql.conf" or die $!;
	print $fh <<"EOF";
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = 80
fsync = off
synchronous_commit = off
full_page_writes = off
log_line_prefix = '%m [%p] %a '
log_min_messages = warning
log_connections = off
restart_after_crash = on
$extra
EOF
	close $fh;
	for my $attempt (1 .. 10)
	{
		$port{$name} = take_port();
		unlink "$work/$name.log";
		my $out = `$bindir/pg_ctl -D $dir -l $work/$name.log -o '-p $port{$name}' -w -t 60 start 2>&1`;
		last unless $?;
		my $log = do { local $/; open my $lf, '<', "$work/$name.log"; <$lf> // '' };
		die "soak: start $name failed:\n$out" unless $log =~ /could not bind|Address already in use/;
		logmsg("$name: port $port{$name} taken meanwhile; trying the next one");
	}
	die "soak: $name: no port after 10 attempts\n" unless -f "$dir/postmaster.pid";
	open my $pf, '<', "$dir/postmaster.pid" or die "soak: no postmaster.pid for $name\n";
	chomp(my $pid = <$pf>);
	close $pf;
	$started_pids{$pid} = $dir;
	logmsg("started $name: port $port{$name}, postmaster pid $pid");
	return $pid;
}

sub stop_servers
{
	for my $pid (keys %started_pids)
	{
		kill 'INT', $pid;    # fast shutdown
	}
	my $deadline = time + 60;
	for my $pid (keys %started_pids)
	{
		while (kill(0, $pid) && time < $deadline) { sleep 0.1; }
		if (kill 0, $pid)
		{
			logmsg("postmaster $pid did not stop in 60 s: SIGQUIT");
			kill 'QUIT', $pid;
			sleep 2;
			kill 'KILL', $pid if kill 0, $pid;
		}
		delete $started_pids{$pid};
	}
}

# psql, one statement or a script; returns (stdout, exit code).
sub psql
{
	my ($name, $sql) = @_;
	my $f = "$work/.sql.$$";
	open my $fh, '>', $f or die $!;
	print $fh $sql;
	close $fh;
	my $out = `PGOPTIONS='-c statement_timeout=60s' $PSQL -X -At -q -h $work -p $port{$name} -d postgres -v ON_ERROR_STOP=1 -f $f 2>&1`;
	my $rc = $? >> 8;
	unlink $f;
	return wantarray ? ($out, $rc) : $out;
}

sub psql_ok
{
	my ($name, $sql) = @_;
	my ($out, $rc) = psql($name, $sql);
	die "soak: psql on $name failed ($rc): $sql\n$out" if $rc;
	chomp $out;
	return $out;
}

my $finished = 0;
my @proxies;
sub cleanup
{
	return if $$ != $parent_pid || $finished++;
	kill 'KILL', $_ for @children;
	waitpid($_, 0) for @children;
	$_->stop for @proxies;
	stop_servers();
}
$SIG{INT} = $SIG{TERM} = sub { logmsg('interrupted'); cleanup(); exit 2; };
END { cleanup() if $$ == $parent_pid; }

logmsg("soak: DURATION=$duration s, clients=$nclients, seed=$seed, work dir $work, "
	  . "pg_config $pg_config");

for my $p (qw(p1 p2 p3))
{
	init_server($p, '');
	psql_ok($p, <<'EOF');
CREATE TABLE soak_t (id bigserial PRIMARY KEY, client int, v int, at timestamptz DEFAULT now());
EOF
}
init_server('coord', <<"EOF");
shared_preload_libraries = 'pg_peerpool'
peerpool.database = 'postgres'
peerpool.application_name = '$APP'
peerpool.health_check_interval = '1s'
peerpool.health_check_timeout = '1s'
peerpool.connect_timeout = '2s'
peerpool.query_timeout = '10s'
peerpool.acquire_timeout = '3s'
peerpool.reconnect_backoff_initial = '200ms'
peerpool.reconnect_backoff_max = '2s'
peerpool.drain_timeout = '3s'
peerpool.max_nodes = 16
EOF

for my $i (1, 2)
{
	my $proxy;
	for my $attempt (1 .. 10)
	{
		$port{"px$i"} = take_port();
		$proxy = eval { FaultProxy->new(upstream_port => $port{"p$i"}, port => $port{"px$i"},
				name => "px$i", log => "$work/fault_proxy_px$i.log") };
		last if $proxy;
		logmsg("proxy px$i: port $port{\"px$i\"}: $@");
	}
	die "soak: proxy px$i: no port after 10 attempts\n" unless $proxy;
	push @proxies, $proxy;
	logmsg("proxy px$i: 127.0.0.1:$port{\"px$i\"} -> p$i (pid " . $proxies[-1]->pid . ')');
}

my %conninfo = (
	p1 => "host=127.0.0.1 port=$port{px1} dbname=postgres user=postgres",
	p2 => "host=127.0.0.1 port=$port{px2} dbname=postgres user=postgres",
	p3 => "host=127.0.0.1 port=$port{p3} dbname=postgres user=postgres");
psql_ok('coord', <<"EOF");
CREATE EXTENSION pg_peerpool;
SELECT peerpool.pool_add_node('p1', '$conninfo{p1}', min_connections => 2, max_connections => $MAXC);
SELECT peerpool.pool_add_node('p2', '$conninfo{p2}', min_connections => 2, max_connections => $MAXC);
SELECT peerpool.pool_add_node('p3', '$conninfo{p3}', min_connections => 2, max_connections => $MAXC);
EOF

sub wait_healthy
{
	my ($timeout) = @_;
	my $deadline = time + $timeout;
	while (time < $deadline)
	{
		my $n = psql('coord', "SELECT count(*) FROM peerpool.node_health WHERE state = 'healthy' "
			  . "AND node_name IN ('p1','p2','p3')");
		return 1 if ($n // '') =~ /^3$/m;
		sleep 0.2;
	}
	return 0;
}
wait_healthy(60) or die "soak: the three nodes did not become healthy within 60 s\n"
  . psql('coord', 'SELECT node_name, state, last_error FROM peerpool.node_health');

# ---------------------------------------------------------------------------------------
# Pool manager sampling: pid, restarts, RSS and descriptors from /proc, pooled connections.

sub pm_sample
{
	my $row = psql('coord', "SELECT pid, restarts, state, (SELECT coalesce(sum(total), 0) "
		  . "FROM peerpool.pool_stats) FROM peerpool.pool_manager");
	my ($pid, $restarts, $state, $pooled) = split /\|/, ($row // '') =~ s/\s+$//r;
	my %s = (at => time, pid => $pid, restarts => $restarts, state => $state,
		pooled => $pooled);
	if ($pid && open my $fh, '<', "/proc/$pid/status")
	{
		while (<$fh>) { $s{rss_kb} = $1 if /^VmRSS:\s+(\d+)/; }
		close $fh;
	}
	if ($pid && open my $sh, '<', "/proc/$pid/stat")
	{
		# utime and stime (fields 14 and 15), in clock ticks (100 per second on Linux).
		my @f = split ' ', ((<$sh> // '') =~ s/^.*\)\s*//r);
		close $sh;
		$s{cpu_s} = sprintf('%.1f', ($f[11] + $f[12]) / 100) if @f > 12;
	}
	if ($pid && opendir my $dh, "/proc/$pid/fd")
	{
		$s{fds} = grep { /^\d+$/ } readdir $dh;
		closedir $dh;
	}
	$s{$_} //= '?' for qw(pid restarts state pooled rss_kb fds cpu_s);
	return \%s;
}

sub fmt_sample
{
	my ($s) = @_;
	return sprintf('pid %s (%s, restarts %s), RSS %s kB, fds %s, pooled connections %s, CPU %s s',
		@$s{qw(pid state restarts rss_kb fds pooled cpu_s)});
}

# ---------------------------------------------------------------------------------------
# Load: each loop is a child process that runs psql scripts of a few statements and writes one
# line per request to its result file: loop, type, status (ok or SQLSTATE), ms, kind.

my $t_start = time;
my $t_end   = $t_start + $duration;

# What a request reports as its kind: the message with node names, numbers and pids generalized.
sub kind_of
{
	my ($msg) = @_;
	$msg //= '';
	$msg =~ s/\s+/ /g;
	$msg =~ s/\s*\[SQLSTATE [0-9A-Z]{5}\]//g;
	$msg =~ s/node "[^"]*"/node "*"/g;
	$msg =~ s/\b(tmp\d+|p[123])\b/*/g;
	$msg =~ s/\d+(\.\d+)?/N/g;
	$msg =~ s/^\s+|\s+$//g;
	return substr($msg, 0, 110) =~ s/\s+$//r;
}

sub sqlq { my ($s) = @_; $s =~ s/'/''/g; return "'$s'"; }

# One request: [type, sql, deadline ms]. Statements after the main one (cleanup) have no type.
sub client_request
{
	my ($c) = @_;
	my $r = rand 100;
	my $n = 1 + int rand 2000;
	my @named = ('p1', 'p2', 'p3');
	my $node = $named[ int rand 3 ];
	if ($r < 16)
	{
		return [ 'pool_query read',
			"SELECT x FROM peerpool.pool_query('SELECT 1', 'read', $QT_MS) AS t(x int)" ];
	}
	if ($r < 28)
	{
		return [ 'pool_query node',
			"SELECT count(*) FROM peerpool.pool_query('SELECT g FROM generate_series(1, $n) g', '$node', $QT_MS) AS t(g int)" ];
	}
	if ($r < 36)
	{
		return [ 'pool_query write',
			"SELECT id FROM peerpool.pool_query('INSERT INTO soak_t (client, v) VALUES ($c, $n) RETURNING id', 'write', $QT_MS) AS t(id bigint)" ];
	}
	if ($r < 56)
	{
		return [ 'parallel_query',
			"SELECT '\@\@N|' || count(*) FILTER (WHERE success) || '|' || coalesce(string_agg(CASE WHEN NOT success THEN regexp_replace(error, '\\s+', ' ', 'g') END, '\@\@SEP'), '') FROM peerpool.parallel_query('SELECT g, md5(g::text) FROM generate_series(1, $n) g', NULL, $QT_MS)" ];
	}
	if ($r < 62)
	{
		# An open remote transaction on every node: each must be rolled back before reuse.
		return [ 'parallel_query open tx',
			"SELECT '\@\@N|' || count(*) FILTER (WHERE success) || '|' || coalesce(string_agg(CASE WHEN NOT success THEN regexp_replace(error, '\\s+', ' ', 'g') END, '\@\@SEP'), '') FROM peerpool.parallel_query('BEGIN; INSERT INTO soak_t (client, v) VALUES ($c, -1); SELECT pg_sleep(0.05)', NULL, $QT_MS)" ];
	}
	if ($r < 80)
	{
		my $on_error = (qw(warning ignore error))[ int rand 3 ];
		return [ "parallel_query_rows $on_error",
			"SELECT count(*) FROM peerpool.parallel_query_rows('SELECT g, md5(g::text) FROM generate_series(1, $n) g', NULL, $QT_MS, '$on_error') AS t(node text, g int, m text)" ];
	}
	if ($r < 86)
	{
		return [ 'pool_query sleep',
			"SELECT count(*) FROM peerpool.pool_query('SELECT pg_sleep(0.2)', 'read', $QT_MS) AS t(x text)" ];
	}
	if ($r < 90)
	{
		# A deadline that expires on purpose: 57014, the remote query cancelled.
		return [ 'parallel_query deadline',
			"SELECT '\@\@N|' || count(*) FILTER (WHERE success) || '|' || coalesce(string_agg(CASE WHEN NOT success THEN regexp_replace(error, '\\s+', ' ', 'g') END, '\@\@SEP'), '') FROM peerpool.parallel_query('SELECT pg_sleep(0.3)', NULL, 100)", 100 ];
	}
	if ($r < 95)
	{
		# The caller cancelled by statement_timeout while the remote query runs.
		return [ 'pool_query cancelled', 'SELECT count(*) FROM peerpool.pool_query(\'SELECT pg_sleep(1)\', \'read\') AS t(x text)', 150,
			"BEGIN;\nSET LOCAL statement_timeout = '150ms';", "ROLLBACK;", '57014' ];
	}
	return [ 'pool_query error',
		"SELECT x FROM peerpool.pool_query('SELECT 1/0', '$node', $QT_MS) AS t(x int)", undef,
		undef, undef, '22012' ];
}

# Runs requests (each [type, sql, deadline_ms, before, after, expected SQLSTATE]) in one psql and appends their
# outcomes to $out. Returns the number of requests.
my $batch_no = 0;
sub run_requests
{
	my ($loop, $out, @reqs) = @_;
	my $f = "$work/.batch.$$";
	open my $fh, '>', $f or die $!;
	print $fh "\\timing on\n";
	my $i = 0;
	for my $r (@reqs)
	{
		print $fh "$r->[3]\n" if $r->[3];
		print $fh "\\echo \@\@S $i\n$r->[1];\n\\echo \@\@E $i :SQLSTATE\n";
		print $fh "\\if :ERROR\n\\echo \@\@M $i :LAST_ERROR_MESSAGE\n\\endif\n";
		print $fh "$r->[4]\n" if $r->[4];
		$i++;
	}
	close $fh;
	my $errf = "$work/.batch.$$.err";
	my $t0 = time;
	# A hard bound on the whole script: no call may hang the loop.
	my $limit = 30 + 15 * @reqs;
	my $output = `PGOPTIONS='-c statement_timeout=30s' PGAPPNAME=soak_$loop timeout -s KILL $limit $PSQL -X -At -h $work -p $port{coord} -d postgres -v VERBOSITY=verbose -f $f 2>$errf`;
	my $rc = $?;
	my $wall = (time - $t0) * 1000;
	my (%res, $cur);
	for my $line (split /\n/, $output)
	{
		if ($line =~ /^\@\@S (\d+)$/) { $cur = $1; $res{$cur} = { status => 'none' }; next; }
		next unless defined $cur;
		if ($line =~ /^\@\@E (\d+) (\S+)$/) { $res{$1}{status} = $2 eq '00000' ? 'ok' : $2; next; }
		if ($line =~ /^\@\@M (\d+) (.*)$/) { $res{$1}{msg} = $2; next; }
		# The first Time after the marker is the request's (statements after it come later).
		if ($line =~ /^Time: ([\d.]+) ms/) { $res{$cur}{ms} //= $1; next; }
		if ($line =~ /^\@\@N\|(\d+)\|(.*)$/) { $res{$cur}{nodes_ok} = $1; $res{$cur}{node_errors} = [ grep { length } split /\@\@SEP/, $2 ]; next; }
	}
	# parallel_query_rows 'warning': one WARNING per failed node on stderr.
	my @warnings;
	if (open my $eh, '<', $errf)
	{
		while (<$eh>) { push @warnings, $1 if /^psql:[^:]*:\d+: WARNING:\s+(.*)$/ || /^WARNING:\s+(.*)$/; }
		close $eh;
	}
	for my $k (0 .. $#reqs)
	{
		my $r = $reqs[$k];
		my $x = $res{$k} // { status => ($rc >> 8) == 137 ? 'hang (killed)' : 'not run' };
		my $status = $x->{status} // 'none';
		my $ms = $x->{ms} // -1;
		my $kind = $status eq 'ok' ? '' : kind_of($x->{msg} // '');
		print $out join("\t", 'R', $loop, $r->[0], $status, sprintf('%.1f', $ms),
			$r->[2] // $QT_MS, $kind, $r->[5] // ''), "\n";
		for my $e (@{ $x->{node_errors} // [] })
		{
			my $st = $e =~ /SQLSTATE ([0-9A-Z]{5})/ ? $1 : '-';
			print $out join("\t", 'N', $loop, $r->[0], $st, kind_of($e)), "\n";
		}
	}
	for my $w (@warnings)
	{
		my ($st, $m) = $w =~ /^([0-9A-Z]{5}): (.*)$/ ? ($1, $2) : ('-', $w);
		print $out join("\t", 'N', $loop, 'parallel_query_rows warning', $st, kind_of($m)), "\n";
	}
	print $out join("\t", 'B', $loop, scalar(@reqs), sprintf('%.0f', $wall), $rc), "\n";
	unlink $f, $errf;
	return scalar @reqs;
}

sub start_loop
{
	my ($name, $body) = @_;
	my $pid = fork // die "fork: $!";
	if ($pid == 0)
	{
		@proxies = ();    # the proxies belong to the parent
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		srand($seed + $$);
		open my $out, '>>', "$work/results.$name" or die $!;
		$out->autoflush(1);
		eval { $body->($out); 1 } or print STDERR "soak: loop $name died: $@";
		close $out;
		POSIX::_exit(0);
	}
	push @children, $pid;
	return $pid;
}

sub alive { return getppid() == $parent_pid && time < $t_end; }

for my $c (1 .. $nclients)
{
	start_loop("client$c", sub {
		my ($out) = @_;
		while (alive())
		{
			run_requests("client$c", $out, map { client_request($c) } 1 .. 8);
		}
	});
}

# Registry changes: alter p3's max_connections and conninfo, p1's weight, p2's min_connections,
# and a transient node added (through proxy 2, or straight to p3), used, and removed.
start_loop('registry', sub {
	my ($out) = @_;
	my $k = 0;
	while (alive())
	{
		my $r = rand 100;
		my @reqs;
		if ($r < 25)
		{
			my $m = 2 + int rand 5;
			@reqs = ([ 'alter max_connections', "SELECT peerpool.pool_alter_node('p3', max_connections => $m)" ]);
		}
		elsif ($r < 40)
		{
			my $w = int rand 200;
			@reqs = ([ 'alter weight', "SELECT peerpool.pool_alter_node('p1', weight => $w)" ]);
		}
		elsif ($r < 50)
		{
			my $m = 1 + int rand 3;
			@reqs = ([ 'alter min_connections', "SELECT peerpool.pool_alter_node('p2', min_connections => $m)" ]);
		}
		elsif ($r < 60)
		{
			my $ct = 2 + int rand 3;
			@reqs = ([ 'alter conninfo', "SELECT peerpool.pool_alter_node('p3', conninfo => " . sqlq("$conninfo{p3} connect_timeout=$ct") . ')' ]);
		}
		else
		{
			$k++;
			my $ci = rand() < 0.5 ? $conninfo{p2} : $conninfo{p3};
			@reqs = (
				[ 'add node', "SELECT peerpool.pool_add_node('tmp$k', " . sqlq($ci) . ', min_connections => 1, max_connections => 2)' ],
				[ 'check transient', "SELECT state FROM peerpool.pool_check_health('tmp$k')" ],
				[ 'parallel_query transient', "SELECT '\@\@N|' || count(*) FILTER (WHERE success) || '|' || coalesce(string_agg(CASE WHEN NOT success THEN regexp_replace(error, '\\s+', ' ', 'g') END, '\@\@SEP'), '') FROM peerpool.parallel_query('SELECT 1', ARRAY['tmp$k'], $QT_MS)" ],
				[ 'remove node', "SELECT peerpool.pool_remove_node('tmp$k')" ]);
		}
		run_requests('registry', $out, @reqs);
		sleep 1 + rand 3;
	}
});

start_loop('health', sub {
	my ($out) = @_;
	while (alive())
	{
		run_requests('health', $out,
			[ 'pool_check_health', 'SELECT count(*) FROM peerpool.pool_check_health()' ],
			[ 'pool_stats', 'SELECT count(*) FROM peerpool.pool_stats' ]);
		sleep 1 + rand 2;
	}
});

# ---------------------------------------------------------------------------------------
# Faults (this process owns the proxies), and a sample of the pool manager every 10 s.

# The pools are still filling to min_connections right after the nodes turned healthy.
sleep 3;
my $s_start = pm_sample();
logmsg('start: pool manager ' . fmt_sample($s_start));
my @samples = ($s_start);
my %pm_pids = ($s_start->{pid} => 1);
my %faults;
my @types = qw(R Q D C Z);
my $next_sample = time + 10;
my $next_report = time + 60;

sub sample_now
{
	my $s = pm_sample();
	push @samples, $s;
	$pm_pids{ $s->{pid} } = 1 if $s->{pid} =~ /^\d+$/;
	return $s;
}

# Sleep until $until, sampling meanwhile.
sub idle_until
{
	my ($until) = @_;
	while ((my $left = $until - time) > 0)
	{
		sleep($left < 0.5 ? $left : 0.5);
		if (time >= $next_sample) { sample_now(); $next_sample = time + 10; }
		if (time >= $next_report)
		{
			my $n = 0;
			for my $f (glob "$work/results.*")
			{
				open my $fh, '<', $f or next;
				while (<$fh>) { $n++ if /^R\t/; }
				close $fh;
			}
			logmsg(sprintf('t+%.0fs: %d requests; pool manager %s', time - $t_start, $n,
					fmt_sample($samples[-1])));
			$next_report = time + 60;
		}
	}
}

while (time < $t_end - 2)
{
	idle_until(time + rand(2 * $fault_gap));
	last if time >= $t_end - 2;
	my $p = $proxies[ int rand 2 ];
	my $f = int rand 10;
	my $name;
	my $hold = 0.5 + rand 3;    # how long a mode stays on
	eval {
		if ($f == 0)
		{
			my $ms = 20 + int rand 400;
			$name = 'delay';
			$p->delay($ms);
			idle_until(time + $hold);
			$p->delay(0);
		}
		elsif ($f == 1)
		{
			$name = 'freeze+thaw';
			$p->freeze;
			idle_until(time + $hold);
			$p->thaw;
		}
		elsif ($f == 2)
		{
			$name = 'close_all (FIN)';
			$p->close_all;
		}
		elsif ($f == 3)
		{
			$name = 'reset_all (RST)';
			$p->reset_all;
		}
		elsif ($f == 4 || $f == 5)
		{
			my $type = $types[ int rand @types ];
			my $dir = $type eq 'Q' ? 'fb' : 'bf';
			my $how = rand() < 0.5 ? 'fin' : 'rst';
			my $n = 1 + int rand($type eq 'D' ? 500 : 5);
			# AuthenticationOk comes before any query: a match would never hit it.
			my %m = $type ne 'R' && rand() < 0.7 ? (match => qr/generate_series|soak_t|pg_sleep/) : ();
			$name = "kill at $dir $type ($how" . (%m ? ', matching the load' : '') . ')';
			$p->kill_at(dir => $dir, type => $type, n => $n, how => $how, %m);
			idle_until(time + $hold);
			$p->clear_rules;
		}
		elsif ($f == 6)
		{
			my $type = (qw(D C Z T))[ int rand 4 ];    # T: RowDescription
			$name = "garble bf $type";
			$p->garble_at(dir => 'bf', type => $type, n => 1 + int rand 5,
				match => qr/generate_series|soak_t|pg_sleep/);
			idle_until(time + $hold);
			$p->clear_rules;
		}
		elsif ($f == 7)
		{
			$name = 'refuse';
			$p->refuse;
			idle_until(time + $hold);
			$p->pass;
		}
		elsif ($f == 8)
		{
			$name = 'connect_delay';
			$p->connect_delay(200 + int rand 2500);
			$p->close_all;    # so that the pool has to reconnect through the slow connect
			idle_until(time + $hold);
			$p->connect_delay(0);
		}
		else
		{
			$name = 'none (quiet gap)';
			idle_until(time + $hold);
		}
		1;
	} or do {
		$name = 'proxy command failed: ' . ($@ =~ s/\s+/ /gr);
	};
	$faults{$name}++;
}

# ---------------------------------------------------------------------------------------
# The end: wait for the loops, quiesce, then check and report.

logmsg('load window over; waiting for the loops');
my $deadline = time + 120;
for my $pid (@children)
{
	while (waitpid($pid, WNOHANG) == 0)
	{
		if (time > $deadline) { logmsg("loop $pid still running after 120 s: killing"); kill 'KILL', $pid; waitpid($pid, 0); last; }
		sleep 0.2;
	}
}
@children = ();
my $t_load = time - $t_start;
my %pstats = map { ("px$_" => $proxies[ $_ - 1 ]->stats) } 1, 2;
$_->pass for @proxies;
my $healthy_after = time;
my $healthy = wait_healthy(60);
$healthy_after = time - $healthy_after;

# The nodes must serve again: one parallel_query over the three.
my $final = psql('coord', "SELECT string_agg(node_name || '=' || success, ' ' ORDER BY node_name) FROM peerpool.parallel_query('SELECT 1', ARRAY['p1','p2','p3'], $QT_MS)");
chomp $final;
# Idle pools settle back to min_connections; give the pool a few seconds.
sleep 3;
my $s_end = sample_now();

# Peer sessions of the pool manager: by state, and none idle in transaction (polled for 10 s:
# a session returned a moment ago may still be between its ROLLBACK and its reset).
my %peer;
for my $p (qw(p1 p2 p3))
{
	my $t_deadline = time + 10;
	my $rows;
	while (1)
	{
		$rows = psql($p, "SELECT coalesce(state, '-') || '=' || count(*) FROM pg_stat_activity WHERE application_name = '$APP' GROUP BY state ORDER BY 1");
		last if $rows !~ /idle in transaction/ || time > $t_deadline;
		sleep 0.2;
	}
	$rows =~ s/\n/ /g;
	$rows =~ s/\s+$//;
	$peer{$p} = $rows;
}
my $maxc_now = psql('coord', "SELECT string_agg(node_name || '=' || max_connections, ' ' ORDER BY node_name) FROM peerpool.nodes");
chomp $maxc_now;
my $nodes_left = psql('coord', "SELECT string_agg(node_name, ' ' ORDER BY node_name) FROM peerpool.nodes");
chomp $nodes_left;
my $stats = psql('coord', "SELECT node_name, state, total, active, idle, waiting, created, closed, queries, errors FROM peerpool.pool_stats ORDER BY 1");
my $events = psql('coord', "SELECT count(*) FROM peerpool.events");
chomp $events;

# Server logs: crashes and PANICs.
my %crash;
for my $n (qw(coord p1 p2 p3))
{
	open my $fh, '<', "$work/$n.log" or next;
	while (<$fh>)
	{
		$crash{$n}{'terminated by signal'}++ if /terminated by signal/;
		$crash{$n}{PANIC}++ if /PANIC:/;
		$crash{$n}{'sanitizer'}++ if /AddressSanitizer|runtime error:/;
	}
	close $fh;
}

# Aggregate the loops' results.
my (%req, %err, %node_err, %lat, $nreq, $nerr, $nexp, @over, $batches, $hard_kills);
for my $f (glob "$work/results.*")
{
	open my $fh, '<', $f or next;
	while (<$fh>)
	{
		chomp;
		my @x = split /\t/;
		if ($x[0] eq 'R')
		{
			my (undef, $loop, $type, $status, $ms, $dl, $kind, $expect) = @x;
			$nreq++;
			$req{$type}{total}++;
			if ($status eq 'ok') { $req{$type}{ok}++; }
			elsif ($expect && $status eq $expect)
			{
				$nexp++;
				$req{$type}{expected}++;
				$err{"$status  $kind  (intended)"}++;
			}
			else
			{
				$nerr++;
				$err{"$status  $kind"}++;
			}
			push @{ $lat{$type} }, $ms if $ms >= 0;
			push @over, "$type $ms ms ($status)" if $ms > $dl + 1000;
		}
		elsif ($x[0] eq 'N')
		{
			# The deadline requests time out on every node on purpose.
			my $intended = $x[2] eq 'parallel_query deadline' && $x[3] eq '57014';
			$node_err{"$x[3]  $x[4]" . ($intended ? '  (intended)' : '')}++;
		}
		elsif ($x[0] eq 'B')
		{
			$batches++;
			$hard_kills++ if ($x[4] >> 8) == 137;
		}
	}
	close $fh;
}

sub pct
{
	my ($v, $p) = @_;
	return '-' unless @$v;
	my @s = sort { $a <=> $b } @$v;
	return sprintf('%.0f', $s[ int(($#s) * $p) ]);
}

my $pm_restarts = (keys %pm_pids) - 1;
my ($rss_max) = sort { $b <=> $a } grep { /^\d+$/ } map { $_->{rss_kb} } @samples;
my ($fds_max) = sort { $b <=> $a } grep { /^\d+$/ } map { $_->{fds} } @samples;

print "\n==== soak summary\n";
printf "seed %d; load %.0f s (DURATION=%d), %d client loops + registry loop + health loop; %d psql scripts\n",
  $seed, $t_load, $duration, $nclients, $batches // 0;
printf "requests: %d total, %d ok, %d failed as intended (1/0: 22012, statement_timeout: 57014), %d failed otherwise (%.1f%%)\n",
  $nreq // 0, ($nreq // 0) - ($nerr // 0) - ($nexp // 0), $nexp // 0, $nerr // 0,
  $nreq ? 100 * ($nerr // 0) / $nreq : 0;
printf "  %-28s %7s %7s %8s %8s %8s %8s\n", 'request type', 'total', 'ok', 'intended', 'p50 ms', 'p99 ms', 'max ms';
for my $t (sort keys %req)
{
	printf "  %-28s %7d %7d %8s %8s %8s %8s\n", $t, $req{$t}{total}, $req{$t}{ok} // 0,
	  $req{$t}{expected} // '', pct($lat{$t} // [], 0.5), pct($lat{$t} // [], 0.99),
	  pct($lat{$t} // [], 1);
}
print "request errors by SQLSTATE and kind:\n";
printf "  %6d  %s\n", $err{$_}, $_ for sort { $err{$b} <=> $err{$a} || $a cmp $b } keys %err;
print "  (none)\n" unless %err;
print "node failures inside parallel_query / parallel_query_rows (the call itself succeeded) by SQLSTATE and kind:\n";
printf "  %6d  %s\n", $node_err{$_}, $_ for sort { $node_err{$b} <=> $node_err{$a} || $a cmp $b } keys %node_err;
print "  (none)\n" unless %node_err;
printf "calls slower than their deadline + 1 s: %d%s\n", scalar @over, @over ? ' (' . join('; ', @over[ 0 .. ($#over < 9 ? $#over : 9) ]) . ')' : '';
printf "psql scripts killed by the hard bound (a hung call): %d\n", $hard_kills // 0;
print "faults injected:\n";
printf "  %6d  %s\n", $faults{$_}, $_ for sort { $faults{$b} <=> $faults{$a} || $a cmp $b } keys %faults;
for my $px (sort keys %pstats)
{
	my $s = $pstats{$px};
	printf "proxy %s: %s connections accepted, %s closed by faults or rules (%s rules fired), %s refused, %s upstream connects failed\n",
	  $px, map { $s->{$_} // 0 } qw(accepted actions fired refused upstream_failed);
}
print "pool manager:\n";
print "  start: " . fmt_sample($s_start) . "\n";
print "  end:   " . fmt_sample($s_end) . "\n";
printf "  max over %d samples (every 10 s): RSS %s kB, fds %s\n", scalar @samples, $rss_max // '?', $fds_max // '?';
if ($s_start->{fds} =~ /^\d+$/ && $s_end->{fds} =~ /^\d+$/ && $s_start->{pooled} =~ /^\d+$/ && $s_end->{pooled} =~ /^\d+$/)
{
	printf "  fds other than pooled connections: %d -> %d\n", $s_start->{fds} - $s_start->{pooled},
	  $s_end->{fds} - $s_end->{pooled};
}
if ($s_start->{rss_kb} =~ /^\d+$/ && $s_end->{rss_kb} =~ /^\d+$/)
{
	printf "  RSS change: %+d kB\n", $s_end->{rss_kb} - $s_start->{rss_kb};
}
if ($s_start->{cpu_s} =~ /^[\d.]+$/ && $s_end->{cpu_s} =~ /^[\d.]+$/ && $s_end->{at} > $s_start->{at})
{
	printf "  CPU used during the run: %.1f s in %.0f s (%.1f %% of a core)\n",
	  $s_end->{cpu_s} - $s_start->{cpu_s}, $s_end->{at} - $s_start->{at},
	  100 * ($s_end->{cpu_s} - $s_start->{cpu_s}) / ($s_end->{at} - $s_start->{at});
}
printf "  pid %s; pool manager pids seen: %s (%d restart(s)); restarts column %s -> %s\n",
  $s_start->{pid} eq $s_end->{pid} ? 'unchanged' : 'CHANGED', join(' ', sort keys %pm_pids),
  $pm_restarts, $s_start->{restarts}, $s_end->{restarts};
printf "after the load: every proxy back to pass; p1..p3 healthy again: %s (%.1f s); parallel_query on all: %s\n",
  $healthy ? 'yes' : 'NO', $healthy_after, $final;
print "registry at end: $nodes_left (max_connections: $maxc_now)\n";
print "peer sessions of the pool manager at end (application_name $APP, by state):\n";
print "  $_: $peer{$_}\n" for sort keys %peer;
my $idle_tx = grep { /idle in transaction/ } values %peer;
my $over_max = 0;
for my $p (sort keys %peer)
{
	my $n = 0;
	$n += $1 while $peer{$p} =~ /=(\d+)/g;
	my ($m) = $maxc_now =~ /\b$p=(\d+)/;
	$over_max++ if defined $m && $n > $m;
}
printf "  idle in transaction: %s; over max_connections: %s\n", $idle_tx ? 'YES' : 'none',
  $over_max ? 'YES' : 'none';
print "pool_stats at end (node|state|total|active|idle|waiting|created|closed|queries|errors):\n";
print map { "  $_\n" } split /\n/, $stats;
print "events in the ring: $events\n";
my @crashes = map { my $n = $_; map { "$n: $_ x$crash{$n}{$_}" } sort keys %{ $crash{$n} } } sort keys %crash;
print "server logs: " . (@crashes ? join('; ', @crashes) : 'no crash, PANIC or sanitizer report') . "\n";

my @bad;
push @bad, 'the pool manager restarted' if $pm_restarts || $s_start->{pid} ne $s_end->{pid};
push @bad, 'a node did not come back' unless $healthy && $final eq 'p1=true p2=true p3=true';
push @bad, 'a session idle in transaction' if $idle_tx;
push @bad, 'more sessions than max_connections' if $over_max;
push @bad, 'a crash in a server log' if @crashes;
push @bad, 'a call hung past the hard bound' if $hard_kills;
push @bad, 'no request ran' unless $nreq;
print @bad ? 'soak: FAILED: ' . join('; ', @bad) . "\n" : "soak: passed\n";
print "logs: $work (server logs, proxy logs, results.*; removed on success unless SOAK_KEEP=1)\n";
cleanup();
exit(@bad ? 1 : 0);
