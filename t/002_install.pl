# Copyright (c) pg_peerpool contributors

# The installation model (SPEC section 1): the library must be preloaded, the extension
# lives only in peerpool.database, and the worker waits quietly until it is created there.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my $worker = $PeerpoolFleet::WORKER_TYPE;
my @peers  = PeerpoolFleet::peers(1);
my $p1     = $peers[0]->name;

# Run SQL expected to fail; return (psql exit code, stderr) with VERBOSITY verbose so that
# stderr carries the SQLSTATE.
sub fails
{
	my ($node, $db, $sql) = @_;
	my ($out, $err) = ('', '');
	my $ret = $node->psql($db, "\\set VERBOSITY verbose\n$sql",
		stdout => \$out, stderr => \$err);
	return ($ret, $err);
}

# Nothing of the extension is left in database $db.
sub nothing_left
{
	my ($node, $db, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is( $node->safe_psql($db,
			"SELECT (SELECT count(*) FROM pg_extension WHERE extname = 'pg_peerpool') || ','"
			  . " || (SELECT count(*) FROM pg_namespace WHERE nspname = 'peerpool')"),
		'0,0',
		"$what: no extension and no schema peerpool left in database $db");
	return;
}

# ---------------------------------------------------------------------------------------
# Without shared_preload_libraries, CREATE EXTENSION fails with 55000 and a hint.

my $plain = PeerpoolFleet::coordinator('no_preload', no_preload => 1);
my ($ret, $err) = fails($plain, 'postgres', 'CREATE EXTENSION pg_peerpool;');
isnt($ret, 0, 'CREATE EXTENSION without preload fails');
like($err, qr/ERROR:\s+55000:/, 'without preload: SQLSTATE 55000');
like($err, qr/HINT:.*shared_preload_libraries/,
	'without preload: the hint names shared_preload_libraries');
note "without preload, psql said:\n$err";
nothing_left($plain, 'postgres', 'without preload');
is($plain->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = '$worker'"),
	'0', 'without preload no pool manager runs');

# ---------------------------------------------------------------------------------------
# With preload, before CREATE EXTENSION: the worker waits quietly in peerpool.database.

my $coord = PeerpoolFleet::coordinator('coord', no_extension => 1);
# The whole life of the worker so far is in the log from offset 0; everything until the
# node shows in node_health below is checked for errors.
my $t0 = time;
my $elapsed = PeerpoolFleet::wait_until($coord,
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = '$worker' AND datname = 'postgres'"
);
ok(defined $elapsed, 'the pool manager runs in database postgres before CREATE EXTENSION');
my ($waiting_pid) = PeerpoolFleet::worker_pids($coord);

# Wake everything up with a reload while the extension is still missing: a worker that
# only works once the extension exists must still survive its wake-ups quietly.
my $offset = -s $coord->logfile;
$coord->reload;
$coord->wait_for_log(qr/received SIGHUP, reloading configuration files/, $offset);
is_deeply([ PeerpoolFleet::worker_pids($coord) ],
	[$waiting_pid], 'the waiting worker is still the same process after a reload');

# CREATE EXTENSION in a database other than peerpool.database fails with 55000 and a hint
# naming the GUC. Its ERROR lines are excluded from the quiet-wait check by the offsets.
$coord->safe_psql('postgres', 'CREATE DATABASE other');
my $before_other = -s $coord->logfile;
($ret, $err) = fails($coord, 'other', 'CREATE EXTENSION pg_peerpool;');
isnt($ret, 0, 'CREATE EXTENSION in database other fails');
like($err, qr/ERROR:\s+55000:/, 'wrong database: SQLSTATE 55000');
like($err, qr/HINT:.*peerpool\.database/, 'wrong database: the hint names peerpool.database');
note "in database other, psql said:\n$err";
nothing_left($coord, 'other', 'wrong database');
my $after_other = -s $coord->logfile;

# Now create it where it belongs and register a node: it shows within 1 s.
$coord->safe_psql('postgres', 'CREATE EXTENSION pg_peerpool');
my $ci = PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($peers[0]));
my $s  = PeerpoolFleet::session($coord);
PeerpoolFleet::timed_ok(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_add_node('$p1', $ci)",
		"count(*) FILTER (WHERE node_name = '$p1') = 1"),
	1.0, 'first pool_add_node after CREATE EXTENSION applied');
$s->quit;
my @pids_after = PeerpoolFleet::worker_pids($coord);
is(scalar @pids_after, 1, 'one pool manager after CREATE EXTENSION');
note 'worker pid while waiting: ' . $waiting_pid . ', after CREATE EXTENSION: '
  . join(',', @pids_after);

my $log = PeerpoolFleet::log_since($coord, 0);
my $quiet = substr($log, 0, $before_other) . substr($log, $after_other);
my @errors = grep { /\b(ERROR|FATAL|PANIC):/ } split /\n/, $quiet;
is(join("\n", @errors), '', 'no ERROR/FATAL in the log while the worker waited');

# ---------------------------------------------------------------------------------------
# peerpool.database = 'fleet', a database that does not exist yet at start.

my $fleet = PeerpoolFleet::coordinator('fleet_coord',
	conf => "peerpool.database = 'fleet'", no_extension => 1);
$fleet->safe_psql('postgres', 'CREATE DATABASE fleet');
$t0 = time;
$elapsed = PeerpoolFleet::wait_until($fleet,
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = '$worker' AND datname = 'fleet'",
	start => $t0);
ok(defined $elapsed, 'the pool manager ends up connected to database fleet');
note sprintf('worker connected to fleet %.1f ms after CREATE DATABASE', 1000 * ($elapsed // 0));

($ret, $err) = fails($fleet, 'postgres', 'CREATE EXTENSION pg_peerpool;');
isnt($ret, 0, 'with peerpool.database = fleet, CREATE EXTENSION in postgres fails');
like($err, qr/ERROR:\s+55000:/, 'postgres is the wrong database now: SQLSTATE 55000');
like($err, qr/HINT:.*peerpool\.database/, 'postgres is the wrong database now: hint names the GUC');
nothing_left($fleet, 'postgres', 'peerpool.database = fleet');

$fleet->safe_psql('fleet', 'CREATE EXTENSION pg_peerpool');
pass('CREATE EXTENSION in database fleet succeeds');
$s = PeerpoolFleet::session($fleet, dbname => 'fleet');
PeerpoolFleet::timed_ok(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_add_node('$p1', $ci)",
		"count(*) FILTER (WHERE node_name = '$p1') = 1"),
	1.0, 'pool_add_node in database fleet applied');
PeerpoolFleet::timed_ok(
	PeerpoolFleet::timed_change(
		$s, "SELECT peerpool.pool_remove_node('$p1')",
		"count(*) FILTER (WHERE node_name = '$p1') = 0"),
	1.0, 'pool_remove_node in database fleet applied');
$s->quit;

# ---------------------------------------------------------------------------------------

PeerpoolFleet::check_logs($plain, $coord, $fleet, @peers);
$_->stop for ($plain, $coord, $fleet, @peers);

done_testing();
