# Copyright (c) pg_peerpool contributors

# Concurrency and limits (issue 11 item 3; SPEC sections 2, 3, 5 and 7), each with exact
# outcomes and deadlines, measured numbers printed with note:
#  (a) 50 sessions add, use and remove 50 distinct nodes at once, twice each;
#  (b) 200 add/remove cycles of one name from 4 sessions; the name works afterwards;
#  (c) 100, then 200 sessions hammer one node with max_connections => 4: the peer never sees
#      more than 4 sessions of it, and every call succeeds or fails with 53300 at
#      peerpool.acquire_timeout;
#  (e) callers queued behind long calls are served as soon as those calls end;
#  (f) pool_alter_node(max_connections) raised and lowered under load: the new cap holds;
#  (d) peerpool.max_total_connections is never exceeded by three busy nodes, which share it
#      first come, first served;
#  (g) a node whose checks waited on the fleet budget opens no session beyond max_connections
#      when the budget frees up.
# The pool's sessions are counted on the peer (pg_stat_activity, by the application_name
# each node's conninfo sets, sampled every millisecond inside the peer) and on this host
# (TCP sockets of the pool manager to the peer's port). Concurrent callers are pgbench
# clients (one process, all connected before they start) released together by an advisory
# lock; each runs a plpgsql loop that counts its outcomes into a table.

use strict;
use warnings FATAL => 'all';

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $only = $ENV{PEERPOOL_CONC_ONLY} // '';    # e.g. 'cf': run only those parts (development)
sub part { my ($p) = @_; return $only eq '' || index($only, $p) >= 0; }

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
max_connections = 260
shared_buffers = '16MB'
peerpool.health_check_interval = '1s'
peerpool.max_nodes = 64
# A loaded 2-core machine is not a slow peer: no 'degraded' for latency, and connection
# attempts of 50 nodes at once get time to complete.
peerpool.degraded_latency = '4s'
peerpool.connect_timeout = '15s'
EOC
# One peer serves every node; each node's conninfo sets its own application_name, so the
# peer's pg_stat_activity counts each node (or a group of nodes) in one snapshot.
my ($peer) = PeerpoolFleet::peers(1, conf => "max_connections = 200\nshared_buffers = '16MB'\nlog_connections = on\nlog_disconnections = on");
my $base_conninfo = PeerpoolFleet::peer_conninfo($peer);
sub conninfo { my ($app) = @_; return "$base_conninfo application_name=$app"; }

my ($worker) = PeerpoolFleet::worker_pids($coord);
ok(defined $worker, "the pool manager runs (pid $worker)");

$coord->safe_psql('postgres', <<'EOSQL');
-- Polls a boolean query (over shared-memory views) every 5 ms until true or the deadline.
CREATE FUNCTION conc_wait(cond text, timeout_s float8) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
    done boolean;
BEGIN
    LOOP
        EXECUTE cond INTO done;
        IF coalesce(done, false) THEN RETURN true; END IF;
        IF clock_timestamp() > deadline THEN RETURN false; END IF;
        PERFORM pg_sleep(0.005);
    END LOOP;
END $$;

-- The outcome of every hammer session.
CREATE UNLOGGED TABLE hammer_result (phase text, node text, ok int, busy int, other int,
    busy_min_ms float8, busy_max_ms float8, ok_max_ms float8, other_error text);
CREATE UNLOGGED TABLE hammer_ctl (stop boolean);
INSERT INTO hammer_ctl VALUES (false);

-- Calls pool_query(sql, node) in a loop for secs seconds, or until hammer_ctl.stop.
CREATE FUNCTION hammer(phase text, node text, sql text, secs float8) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => secs);
    t0 timestamptz;
    ms float8;
    n_ok int := 0; n_busy int := 0; n_other int := 0;
    b_min float8; b_max float8; o_max float8 := 0;
    first_other text;
BEGIN
    WHILE clock_timestamp() < deadline AND NOT (SELECT stop FROM hammer_ctl) LOOP
        t0 := clock_timestamp();
        BEGIN
            PERFORM * FROM peerpool.pool_query(sql, node) AS t(a text);
            n_ok := n_ok + 1;
            o_max := greatest(o_max, extract(epoch FROM clock_timestamp() - t0) * 1000);
        EXCEPTION WHEN OTHERS THEN
            ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
            IF SQLSTATE = '53300' THEN
                n_busy := n_busy + 1;
                b_min := least(coalesce(b_min, ms), ms);
                b_max := greatest(coalesce(b_max, ms), ms);
            ELSE
                n_other := n_other + 1;
                first_other := coalesce(first_other, SQLSTATE || ': ' || SQLERRM);
                PERFORM pg_sleep(0.01);
            END IF;
        END;
    END LOOP;
    INSERT INTO hammer_result
        VALUES (phase, node, n_ok, n_busy, n_other, b_min, b_max, o_max, first_other);
END $$;
EOSQL

# pgbench runs $clients sessions of the script; each first waits for the shared advisory
# lock 4242, which the gate session holds until all of them wait.
my $gate = $coord->background_psql('postgres');
my $script_no = 0;

sub hammer_start
{
	my (%o) = @_;
	my $file = "${PostgreSQL::Test::Utils::tmp_check}/hammer_" . ++$script_no . '.sql';
	open(my $fh, '>', $file) or die "cannot write $file: $!";
	print $fh "SET peerpool.acquire_timeout = '$o{acquire_ms}ms';\n";
	print $fh "SELECT pg_advisory_lock_shared(4242);\n";
	print $fh "SELECT pg_advisory_unlock_shared(4242);\n";
	print $fh sprintf("SELECT hammer(%s, %s, %s, %s);\n",
		PeerpoolFleet::quote($o{phase}), $o{node_sql}, PeerpoolFleet::quote($o{sql}), $o{secs});
	close $fh;
	$coord->safe_psql('postgres', 'UPDATE hammer_ctl SET stop = false');
	$gate->query_safe('SELECT pg_advisory_lock(4242)');
	my $h = { out => '', err => '' };
	$h->{run} = IPC::Run::start(
		[
			$coord->installed_command('pgbench'), '-n', '-c', $o{clients}, '-j', '2',
			'-t', '1', '-f', $file, '-h', $coord->host, '-p', $coord->port, 'postgres'
		],
		'<', \undef, '>', \$h->{out}, '2>', \$h->{err},
		IPC::Run::timer($o{secs} + 120));
	ok( defined PeerpoolFleet::wait_until($coord,
			"SELECT count(*) = $o{clients} FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted",
			timeout => 60),
		"$o{phase}: $o{clients} sessions connected and waiting at the gate");
	return $h;
}

sub hammer_release
{
	$gate->query_safe('SELECT pg_advisory_unlock(4242)');
	return time;
}

sub hammer_running
{
	my ($h) = @_;
	$h->{run}->pump_nb if $h->{run}->pumpable;
	return $h->{run}->pumpable;
}

# Waits for pgbench; returns the summed outcome of the phase as a hashref.
sub hammer_finish
{
	my ($h, $phase) = @_;
	eval { $h->{run}->finish; 1 } or do { diag "pgbench: $@"; $h->{run}->kill_kill; };
	is($h->{run}->result(0), 0, "$phase: pgbench finished without a failed client")
	  or diag "pgbench stdout:\n$h->{out}\nstderr:\n$h->{err}";
	my ($sessions, $ok, $busy, $other, $bmin, $bmax, $omax, $first) = split /\|/,
	  $coord->safe_psql('postgres', qq{
SELECT count(*), sum(ok), sum(busy), sum(other),
       round(min(busy_min_ms)::numeric, 1), round(max(busy_max_ms)::numeric, 1),
       round(max(ok_max_ms)::numeric, 1), min(other_error)
  FROM hammer_result WHERE phase = '$phase'}), -1;
	return {
		sessions => $sessions, ok => $ok // 0, busy => $busy // 0, other => $other // 0,
		busy_min_ms => $bmin, busy_max_ms => $bmax, ok_max_ms => $omax, first_other => $first // ''
	};
}

# Samplers on the peer: the maximum of a count over pg_stat_activity, every millisecond.
my $sampler  = $peer->background_psql('postgres');
my $sampler2 = $peer->background_psql('postgres');
# "SELECT (count of sessions matching $filter)": append a comparison for a boolean.
# The most TCP connections of this host to the peer's port, sampled every 2 ms while the
# hammer $h runs (until $until at the latest); returns (peak, samples).
sub tcp_peak_while_running
{
	my ($h, $until) = @_;
	my ($max, $samples) = (0, 0);
	while (hammer_running($h) && time < $until)
	{
		my $n = PeerpoolFleet::tcp_clients_to($peer->port);
		$max = $n if $n > $max;
		$samples++;
		usleep(2_000);
	}
	return ($max, $samples);
}

sub count_of { my ($filter) = @_; return "SELECT (SELECT count(*) FROM pg_stat_activity WHERE $filter)"; }

sub wait_healthy
{
	my ($name, $timeout) = @_;
	return PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name = '$name' AND state = 'healthy') = 1", $timeout // 30);
}

# ---- (a) 50 sessions add, use and remove distinct nodes at once -------------------------------
if (part('a'))
{
	my $n = 50;
	my $rounds = 2;
	my $log_offset = -s $coord->logfile;
	$gate->query_safe('SELECT pg_advisory_lock(4243)');
	my @sessions;
	for my $i (1 .. $n)
	{
		my $name = "add_$i";
		my @cmds = ('SELECT pg_advisory_lock_shared(4243)', 'SELECT pg_advisory_unlock_shared(4243)');
		for my $r (1 .. $rounds)
		{
			push @cmds,
			  sprintf("SELECT peerpool.pool_add_node('%s', %s)", $name,
				PeerpoolFleet::quote(conninfo('pp_add'))),
			  "SELECT 'healthy:' || conc_wait(\$\$SELECT count(*) = 1 FROM peerpool.node_health WHERE node_name = '$name' AND state = 'healthy'\$\$, 60)",
			  "SELECT 'query:' || success FROM peerpool.parallel_query('SELECT 1', ARRAY['$name'])",
			  "SELECT peerpool.pool_remove_node('$name')",
			  "SELECT 'gone:' || conc_wait(\$\$SELECT count(*) = 0 FROM peerpool.node_health WHERE node_name = '$name'\$\$, 60)";
		}
		push @sessions, PeerpoolFleet::psql_start($coord, \@cmds, application_name => "adder_$i",
			timeout => 180);
	}
	ok( defined PeerpoolFleet::wait_until($coord,
			"SELECT count(*) = $n FROM pg_locks WHERE locktype = 'advisory' AND objid = 4243 AND NOT granted",
			timeout => 60),
		"(a) $n sessions wait at the gate");
	my $t0 = time;
	$gate->query_safe('SELECT pg_advisory_unlock(4243)');
	my ($good, @bad) = (0);
	my $want = join("\n", ('healthy:true', 'query:true', 'gone:true') x $rounds);
	for my $i (0 .. $#sessions)
	{
		my ($ret, $out, $err) = PeerpoolFleet::psql_finish($sessions[$i]);
		my $got = join("\n", grep { /:/ } split /\n/, $out);
		if ($ret == 0 && $err eq '' && $got eq $want) { $good++; }
		else { push @bad, "session add_" . ($i + 1) . ": exit $ret, out [$got], err [$err]"; }
	}
	note sprintf('(a) %d sessions x %d rounds of add -> healthy -> query -> remove -> gone: %.1f s',
		$n, $rounds, time - $t0);
	is($good, $n, "(a) every session saw its node healthy, queried it and saw it go, $rounds times")
	  or diag join("\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]), "\n",
	  $coord->safe_psql('postgres', 'SELECT * FROM peerpool.node_health'), "\n",
	  $coord->safe_psql('postgres', 'SELECT * FROM peerpool.pool_manager');
	is($coord->safe_psql('postgres', 'SELECT count(*) FROM peerpool.node_health'), '0',
		'(a) node_health is empty');
	is($coord->safe_psql('postgres', 'SELECT count(*) FROM peerpool.node'), '0',
		'(a) peerpool.node is empty');
	my $gone = PeerpoolFleet::wait_until($peer,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pp_add'", timeout => 15);
	ok(defined $gone, '(a) no session of the removed nodes is left on the peer');
	note sprintf('(a) last remote session gone %.0f ms after the check started', 1000 * ($gone // 0));
	is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, '(a) the same pool manager runs');
	my @errors = grep { /ERROR:/ } split /\n/, PeerpoolFleet::log_since($coord, $log_offset);
	is(join("\n", @errors), '', '(a) no ERROR in the coordinator log');
}

# ---- (b) rapid add/remove cycles of one name ---------------------------------------------------
if (part('b'))
{
	my $log_offset = -s $coord->logfile;
	$coord->safe_psql('postgres', sprintf(<<'EOSQL', PeerpoolFleet::quote(conninfo('pp_flip'))));
CREATE PROCEDURE flip(cycles int, seed int, INOUT added int DEFAULT 0, INOUT removed int DEFAULT 0,
    INOUT dup int DEFAULT 0, INOUT missing int DEFAULT 0, INOUT other text DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM setseed(seed / 100.0);
    FOR i IN 1 .. cycles LOOP
        BEGIN
            PERFORM peerpool.pool_add_node('flip', %s);
            added := added + 1;
        EXCEPTION WHEN duplicate_object THEN dup := dup + 1;
                  WHEN OTHERS THEN other := coalesce(other, 'add: ' || SQLSTATE || ' ' || SQLERRM);
        END;
        COMMIT;
        -- Sometimes let the pool manager connect (or start to) before the removal.
        IF random() < 0.3 THEN PERFORM pg_sleep(random() * 0.02); END IF;
        BEGIN
            PERFORM peerpool.pool_remove_node('flip');
            removed := removed + 1;
        EXCEPTION WHEN undefined_object THEN missing := missing + 1;
                  WHEN OTHERS THEN other := coalesce(other, 'remove: ' || SQLSTATE || ' ' || SQLERRM);
        END;
        COMMIT;
        IF random() < 0.3 THEN PERFORM pg_sleep(random() * 0.02); END IF;
    END LOOP;
END $$;
EOSQL
	my $cycles = 50;
	my @flippers = map {
		PeerpoolFleet::psql_start($coord, ["CALL flip($cycles, $_)"], application_name => "flip_$_",
			timeout => 120)
	} 1 .. 4;
	my $t0 = time;
	my ($added, $removed, $dup, $missing, @other) = (0, 0, 0, 0);
	for my $h (@flippers)
	{
		my ($ret, $out, $err) = PeerpoolFleet::psql_finish($h);
		my ($na, $nr, $d, $m, $o) = split /\|/, ($out =~ s/\s+\z//r), -1;
		if ($ret != 0 || !defined $m) { push @other, "exit $ret: $out $err"; next; }
		$added += $na; $removed += $nr; $dup += $d; $missing += $m;
		push @other, $o if defined $o && $o ne '';
	}
	note sprintf('(b) 4 sessions x %d cycles in %.1f s: %d adds (%d duplicates), %d removes (%d missing)',
		$cycles, time - $t0, $added, $dup, $removed, $missing);
	is(join("\n", @other), '', '(b) every add and remove succeeded or failed with 42710 / 42704');
	is($added + $dup, 4 * $cycles, '(b) every add accounted for');
	is($removed + $missing, 4 * $cycles, '(b) every remove accounted for');
	my $rows = $coord->safe_psql('postgres', "SELECT count(*) FROM peerpool.node WHERE node_name = 'flip'");
	is($rows, $added - $removed, "(b) the catalog holds what the committed calls left ($rows row)");
	ok( defined PeerpoolFleet::wait_for_health($coord,
			"count(*) FILTER (WHERE node_name = 'flip' AND state <> 'draining') = $rows"
			  . " AND count(*) FILTER (WHERE node_name = 'flip') = $rows", 15),
		'(b) node_health agrees with the catalog');
	$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('flip')") if $rows;
	ok( defined PeerpoolFleet::wait_for_health($coord, 'count(*) = 0', 15),
		'(b) node_health is empty once the name is removed');
	my $gone = PeerpoolFleet::wait_until($peer,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pp_flip'", timeout => 15);
	ok(defined $gone, '(b) no session of the name is left on the peer');
	$coord->safe_psql('postgres', sprintf("SELECT peerpool.pool_add_node('flip', %s)",
		PeerpoolFleet::quote(conninfo('pp_flip'))));
	PeerpoolFleet::timed_ok(wait_healthy('flip', 15), 10, '(b) the name added once more is healthy');
	is($coord->safe_psql('postgres',
			"SELECT * FROM peerpool.pool_query('SELECT current_setting(''application_name'')', 'flip') AS t(a text)"),
		'pp_flip', '(b) and serves pool_query');
	is($coord->safe_psql('postgres', "SELECT success FROM peerpool.parallel_query('SELECT 1', ARRAY['flip'])"),
		't', '(b) and parallel_query');
	$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('flip')");
	ok(defined PeerpoolFleet::wait_for_health($coord, 'count(*) = 0', 15), '(b) removed again');
	ok( defined PeerpoolFleet::wait_until($peer,
			"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'pp_flip'", timeout => 15),
		'(b) nothing left on the peer');
	is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, '(b) the same pool manager runs');
	my @errors = grep { /ERROR:/ } split /\n/, PeerpoolFleet::log_since($coord, $log_offset);
	is(join("\n", @errors), '', '(b) no ERROR in the coordinator log');
}

# ---- (c) 100 and 200 sessions hammer one node with max_connections => 4 ----------------------
my $cap = 4;
if (part('c') || part('e') || part('f'))
{
	$coord->safe_psql('postgres', sprintf(
		"SELECT peerpool.pool_add_node('hammer', %s, min_connections => 1, max_connections => $cap)",
		PeerpoolFleet::quote(conninfo('pp_hammer'))));
	ok(defined wait_healthy('hammer'), 'hammer is healthy');
}
if (part('c'))
{
	my $acquire_ms = 500;
	my $secs = 4;
	for my $clients (100, 200)
	{
		my $phase = "c$clients";
		$coord->safe_psql('postgres', 'SELECT peerpool.pool_reset_stats()');
		my $h = hammer_start(phase => $phase, clients => $clients, acquire_ms => $acquire_ms,
			node_sql => "'hammer'", sql => 'SELECT pg_sleep(0.05)', secs => $secs);
		PeerpoolFleet::stat_sample_start($sampler, count_of("application_name = 'pp_hammer'"), $secs + 1);
		my $t0 = hammer_release();
		my ($tcp_max, $tcp_samples) = tcp_peak_while_running($h, $t0 + $secs + 60);
		my $r = hammer_finish($h, $phase);
		my ($remote_max, $samples) = PeerpoolFleet::stat_sample_finish($sampler);
		note sprintf('(c) %d sessions, max_connections %d, acquire_timeout %d ms, pg_sleep(0.05) for %d s: '
			  . '%d calls succeeded (slowest %s ms), %d failed with 53300 (after %s - %s ms), %d otherwise',
			$clients, $cap, $acquire_ms, $secs, $r->{ok}, $r->{ok_max_ms} // '-', $r->{busy},
			$r->{busy_min_ms} // '-', $r->{busy_max_ms} // '-', $r->{other});
		note sprintf('(c) %d sessions: peak sessions of the node on the peer %s (%s samples); peak TCP connections %d (%d samples)',
			$clients, $remote_max, $samples, $tcp_max, $tcp_samples);
		is($r->{sessions}, $clients, "(c) $clients: every session reported");
		is($r->{other}, 0, "(c) $clients: every call succeeded or failed with 53300")
		  or diag $r->{first_other};
		cmp_ok($r->{ok}, '>=', $cap * 20, "(c) $clients: the pool served calls back to back");
		cmp_ok($r->{busy}, '>=', 1, "(c) $clients: callers beyond what the pool serves in acquire_timeout got 53300");
		cmp_ok($r->{busy_min_ms} // 0, '>=', $acquire_ms - 5, "(c) $clients: no 53300 before acquire_timeout");
		cmp_ok($r->{busy_max_ms} // 9e9, '<', $acquire_ms + 3000, "(c) $clients: 53300 within 3 s of acquire_timeout");
		cmp_ok($samples, '>=', 20, "(c) $clients: the peer was sampled while the calls ran");
		is($remote_max, $cap, "(c) $clients: at most (and at peak) $cap sessions of the node on the peer");
		cmp_ok($tcp_max, '<=', $cap, "(c) $clients: at most $cap TCP connections to the peer");
		my ($timeouts, $total, $waiting) = split /\|/, $coord->safe_psql('postgres',
			"SELECT acquire_timeouts, total, waiting FROM peerpool.pool_stats WHERE node_name = 'hammer'");
		is($timeouts, $r->{busy}, "(c) $clients: pool_stats acquire_timeouts equals the 53300 count");
		cmp_ok($total, '<=', $cap, "(c) $clients: pool_stats total <= $cap");
		is($waiting, '0', "(c) $clients: nobody waits any more");
		is($peer->safe_psql('postgres', count_of("application_name = 'pp_hammer' AND state LIKE 'idle in transaction%'")),
			'0', "(c) $clients: no session idle in transaction");
		is($coord->safe_psql('postgres', "SELECT state FROM peerpool.node_health WHERE node_name = 'hammer'"),
			'healthy', "(c) $clients: the node stayed healthy");
	}
	is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, '(c) the same pool manager runs');
}

# ---- (e) waiters wake when capacity frees -----------------------------------------------------
if (part('e'))
{
	$coord->safe_psql('postgres', sprintf(
		"SELECT peerpool.pool_add_node('wake', %s, min_connections => 1, max_connections => 2)",
		PeerpoolFleet::quote(conninfo('pp_wake'))));
	ok(defined wait_healthy('wake'), '(e) wake is healthy');
	my @holders = map {
		PeerpoolFleet::psql_start($coord, [
			q{SELECT * FROM peerpool.pool_query('SELECT extract(epoch FROM clock_timestamp())::text FROM pg_sleep(3)', 'wake') AS t(a text)}])
	} 1 .. 2;
	ok( defined PeerpoolFleet::wait_until($peer,
			count_of("application_name = 'pp_wake' AND state = 'active' AND query LIKE '%pg_sleep(3)%'") . ' = 2',
			timeout => 10),
		'(e) two long calls hold both connections');
	my @waiters = map {
		PeerpoolFleet::psql_start($coord, [ "SET peerpool.acquire_timeout = '30s'",
			q{SELECT * FROM peerpool.pool_query('SELECT extract(epoch FROM clock_timestamp())::text', 'wake') AS t(a text)}])
	} 1 .. 4;
	ok( defined PeerpoolFleet::wait_until($coord,
			"SELECT waiting = 4 FROM peerpool.pool_stats WHERE node_name = 'wake'", timeout => 10),
		'(e) four callers queue behind them');
	my (@ends, @starts, @bad);
	for my $h (@holders, @waiters)
	{
		my ($ret, $out, $err) = PeerpoolFleet::psql_finish($h);
		$out =~ s/\s+\z//;
		if ($ret != 0 || $out !~ /^[\d.]+$/) { push @bad, "exit $ret: $out $err"; next; }
		push @{ (grep { $_ == $h } @holders) ? \@ends : \@starts }, $out;
	}
	is(join("\n", @bad), '', '(e) every call succeeded');
	@ends   = sort { $a <=> $b } @ends;
	@starts = sort { $a <=> $b } @starts;
	if (@ends == 2 && @starts == 4)
	{
		# The waiters' calls are instant: the first freed connection can serve all four.
		my $first = $starts[0] - $ends[0];
		my $last  = $starts[-1] - $ends[0];
		note sprintf('(e) after the first long call ended (the second %.1f ms later), the first waiter ran '
			  . 'its query after %.1f ms, the fourth after %.1f ms',
			1000 * ($ends[1] - $ends[0]), 1000 * $first, 1000 * $last);
		cmp_ok($first, '<', 1, '(e) the first waiter is served within 1 s of a connection freeing');
		cmp_ok($last, '<', 1, '(e) all four waiters are served within 1 s of it');
		cmp_ok($starts[0], '>=', $ends[0], '(e) no waiter ran before a connection was free');
	}
	$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('wake')");
}

# ---- (f) pool_alter_node(max_connections) raised and lowered under load ------------------------
if (part('f'))
{
	my $alter = sub {
		my ($max) = @_;
		$coord->safe_psql('postgres', "SELECT peerpool.pool_alter_node('hammer', max_connections => $max)");
		return time;
	};
	my $hammer_count = count_of("application_name = 'pp_hammer'");
	# Checks every 5 s: a lowered cap must not wait for checks to close connections.
	PeerpoolFleet::set_gucs($coord, 'peerpool.health_check_interval' => '5s');
	$alter->(2);
	ok( defined PeerpoolFleet::wait_until($peer, "$hammer_count <= 2", timeout => 15),
		'(f) max_connections 2 applied (idle connections above it closed)');
	my $h = hammer_start(phase => 'f', clients => 30, acquire_ms => 10_000, node_sql => "'hammer'",
		sql => 'SELECT pg_sleep(0.05)', secs => 60);
	hammer_release();
	ok( defined PeerpoolFleet::wait_until($coord,
			"SELECT waiting > 5 FROM peerpool.pool_stats WHERE node_name = 'hammer'", timeout => 15),
		'(f) callers queue for the node');
	my @steps = ([ 2, undef ], [ 6, 'raised' ], [ 3, 'lowered' ], [ 5, 'raised' ], [ 1, 'lowered' ]);
	for my $step (@steps)
	{
		my ($max, $how) = @$step;
		if (defined $how)
		{
			my $t = $alter->($max);
			my $cond = $how eq 'raised' ? "= $max" : "<= $max";
			my $seen = PeerpoolFleet::wait_until($peer, "$hammer_count $cond", timeout => 40, start => $t);
			ok(defined $seen, "(f) $how to $max: the peer sees $cond sessions of the node");
			note sprintf('(f) %s to %d: seen on the peer after %.0f ms', $how, $max, 1000 * ($seen // 0));
			# Calls take 50 ms: the cap holds once the calls running at the change returned.
			cmp_ok($seen // 9e9, '<', 3, "(f) $how to $max: within 3 s") if $how eq 'lowered';
		}
		PeerpoolFleet::stat_sample_start($sampler, $hammer_count, 1.5);
		my ($peak, $samples) = PeerpoolFleet::stat_sample_finish($sampler);
		note "(f) max_connections $max under load: peak $peak sessions on the peer ($samples samples)";
		is($peak, $max, "(f) max_connections $max: the peer sees at most (and at peak) $max sessions");
	}
	$coord->safe_psql('postgres', 'UPDATE hammer_ctl SET stop = true');
	my $r = hammer_finish($h, 'f');
	note sprintf('(f) 30 sessions: %d calls succeeded (slowest %s ms), %d failed with 53300, %d otherwise',
		$r->{ok}, $r->{ok_max_ms} // '-', $r->{busy}, $r->{other});
	is($r->{other} + $r->{busy}, 0, '(f) no call failed while max_connections changed')
	  or diag $r->{first_other};
	is($coord->safe_psql('postgres', "SELECT state FROM peerpool.node_health WHERE node_name = 'hammer'"),
		'healthy', '(f) the node stayed healthy');
	ok(defined PeerpoolFleet::wait_until($peer, "$hammer_count <= 1", timeout => 10),
		'(f) the pool is within max_connections 1 when the load ends');
	is(join(',', PeerpoolFleet::worker_pids($coord)), $worker, '(f) the same pool manager runs');
	PeerpoolFleet::set_gucs($coord, 'peerpool.health_check_interval' => undef);
}
if (part('c') || part('e') || part('f'))
{
	$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('hammer')");
	ok(defined PeerpoolFleet::wait_for_health($coord, 'count(*) = 0', 15), 'hammer removed');
}

# ---- (d) peerpool.max_total_connections under contention --------------------------------------
if (part('d'))
{
	my $budget = 5;
	$coord->append_conf('postgresql.conf', "peerpool.max_total_connections = $budget");
	$gate->quit;
	$coord->restart;
	$gate = $coord->background_psql('postgres');
	for my $i (1 .. 3)
	{
		$coord->safe_psql('postgres', sprintf(
			"SELECT peerpool.pool_add_node('d$i', %s, min_connections => 1, max_connections => 4)",
			PeerpoolFleet::quote(conninfo("pp_d$i"))));
	}
	ok( defined PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE state = 'healthy') = 3", 30),
		'(d) three nodes healthy');
	my $secs = 5;
	my $h = hammer_start(phase => 'd', clients => 60, acquire_ms => 2000,
		node_sql => "'d' || (:client_id % 3 + 1)", sql => 'SELECT pg_sleep(0.02)', secs => $secs);
	PeerpoolFleet::stat_sample_start($sampler, count_of("application_name LIKE 'pp_d_'"), $secs + 1);
	PeerpoolFleet::stat_sample_start($sampler2,
		"SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM pg_stat_activity WHERE application_name LIKE 'pp_d_' GROUP BY application_name) s",
		$secs + 1);
	my $t0 = hammer_release();
	my ($tcp_max, $tcp_samples) = tcp_peak_while_running($h, $t0 + $secs + 60);
	my $r = hammer_finish($h, 'd');
	my ($peak, $samples) = PeerpoolFleet::stat_sample_finish($sampler);
	my ($node_peak) = PeerpoolFleet::stat_sample_finish($sampler2);
	my $per_node = $coord->safe_psql('postgres',
		"SELECT string_agg(node || ' ' || ok || '/' || busy, ', ' ORDER BY node) FROM "
		  . "(SELECT node, sum(ok) ok, sum(busy) busy FROM hammer_result WHERE phase = 'd' GROUP BY node) s");
	note sprintf('(d) 60 sessions over 3 nodes (max_connections 4 each), max_total_connections %d: '
		  . '%d calls succeeded, %d failed with 53300 (after %s - %s ms), %d otherwise; per node ok/53300: %s',
		$budget, $r->{ok}, $r->{busy}, $r->{busy_min_ms} // '-', $r->{busy_max_ms} // '-', $r->{other}, $per_node);
	note sprintf('(d) peak sessions on the peer %s (%s samples), busiest node %s; peak TCP connections %d (%d samples)',
		$peak, $samples, $node_peak, $tcp_max, $tcp_samples);
	is($r->{other}, 0, '(d) every call succeeded or failed with 53300') or diag $r->{first_other};
	# The budget is first come, first served across nodes: no node's callers are starved by the
	# others (before this, one run served 458, 20 and 683 calls, and 40 of the second node's
	# calls timed out).
	my ($least, $most) = split /\|/, $coord->safe_psql('postgres',
		"SELECT min(ok), max(ok) FROM (SELECT node, sum(ok) ok FROM hammer_result WHERE phase = 'd' GROUP BY node) s");
	cmp_ok($least, '>=', $most / 4, "(d) every node got its share of the budget (least served $least, most $most calls)");
	cmp_ok($r->{ok}, '>', 0, '(d) calls were served');
	cmp_ok($r->{busy_min_ms} // 9e9, '>=', 2000 - 5, '(d) no 53300 before acquire_timeout') if $r->{busy};
	cmp_ok($samples, '>=', 20, '(d) the peer was sampled while the calls ran');
	cmp_ok($peak, '<=', $budget, "(d) the peer never saw more than max_total_connections ($budget) sessions");
	cmp_ok($node_peak, '<=', 4, '(d) nor more than max_connections (4) of one node');
	cmp_ok($tcp_max, '<=', $budget, "(d) never more than $budget TCP connections to the peer");
	is($coord->safe_psql('postgres', "SELECT count(*) FROM peerpool.node_health WHERE state = 'healthy'"),
		'3', '(d) every node stayed healthy');
	is($coord->safe_psql('postgres', 'SELECT sum(waiting) FROM peerpool.pool_stats'), '0', '(d) nobody waits any more');
}

# ---- (g) a node starved by the fleet budget, then given it back ------------------------------
# Its health check waited on the budget (a local limit) for several check intervals; when the
# budget frees up, its waiting callers get their connections first. The check must then wait
# for one of those to come back, not count the budget wait as "callers held every connection
# for an interval" and open an extra session beyond max_connections (seen once in (d), where a
# starved node showed 5 sessions with max_connections 4).
if (part('g'))
{
	my $budget = 5;
	if (!part('d'))
	{
		$coord->append_conf('postgresql.conf', "peerpool.max_total_connections = $budget");
		$gate->quit;
		$coord->restart;
		$gate = $coord->background_psql('postgres');
	}
	else
	{
		$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('d$_')") for 1 .. 3;
	}
	$coord->safe_psql('postgres', sprintf(
		"SELECT peerpool.pool_add_node('g1', %s, min_connections => 0, max_connections => $budget)",
		PeerpoolFleet::quote(conninfo('pp_g1'))));
	$coord->safe_psql('postgres', sprintf(
		"SELECT peerpool.pool_add_node('g2', %s, min_connections => 0, max_connections => 2)",
		PeerpoolFleet::quote(conninfo('pp_g2'))));
	ok( defined PeerpoolFleet::wait_for_health($coord, "count(*) = 2 AND bool_and(state = 'healthy')", 30),
		'(g) g1 and g2 healthy, nothing else registered');
	# g1's callers take the whole budget (g2's idle check connection is evicted for them).
	my @long = map {
		PeerpoolFleet::psql_start($coord,
			[ q{SELECT count(*) FROM peerpool.pool_query('SELECT pg_sleep(4)', 'g1') AS t(a text)} ])
	} 1 .. $budget;
	ok( defined PeerpoolFleet::wait_until($peer,
			"SELECT count(*) FILTER (WHERE application_name = 'pp_g1' AND query = 'SELECT pg_sleep(4)' AND state = 'active') = $budget"
			  . " AND count(*) FILTER (WHERE application_name = 'pp_g2') = 0 FROM pg_stat_activity", timeout => 20),
		"(g) g1's $budget calls hold the whole budget; g2 has no connection");
	PeerpoolFleet::stat_sample_start($sampler, count_of("application_name = 'pp_g2'"), 9);
	# Two callers queue for g2 (each then makes three short calls) while its checks starve.
	my @short = map {
		PeerpoolFleet::psql_start($coord,
			[ "SET peerpool.acquire_timeout = '20s'",
			  map { q{SELECT count(*) FROM peerpool.pool_query('SELECT pg_sleep(0.3)', 'g2') AS t(a text)} } 1 .. 3 ])
	} 1 .. 2;
	my $bad = 0;
	for my $h (@long, @short)
	{
		my ($ret, $out, $err) = PeerpoolFleet::psql_finish($h);
		if ($ret != 0) { $bad++; diag "(g) a call failed: $err"; }
	}
	is($bad, 0, '(g) every call succeeded');
	my ($peak, $samples) = PeerpoolFleet::stat_sample_finish($sampler);
	note "(g) g2 (max_connections 2): peak $peak sessions on the peer ($samples samples)";
	cmp_ok($samples, '>=', 20, '(g) the peer was sampled while the calls ran');
	cmp_ok($peak, '<=', 2, '(g) g2 never had more than max_connections (2) sessions after its starved checks');
	is($coord->safe_psql('postgres', "SELECT string_agg(state, ',' ORDER BY node_name) FROM peerpool.node_health"),
		'healthy,healthy', '(g) both nodes stayed healthy');
}

$_->quit for ($gate, $sampler, $sampler2);
my @errors = grep { /ERROR:/ } split /\n/, slurp_file($coord->logfile);
is(join("\n", @errors[0 .. ($#errors < 19 ? $#errors : 19)]), '', 'no ERROR in the coordinator log');
PeerpoolFleet::check_logs($coord, $peer);
$_->stop for ($coord, $peer);
done_testing();
