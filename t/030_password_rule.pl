# Copyright (c) pg_peerpool contributors

# The password rule (SPEC section 2; issue 8, finding 1): EXECUTE on pool_add_node is not a key
# to the server's OS identity. A node whose conninfo a non-superuser set must authenticate with
# the password written in its conninfo: at registration the conninfo must hold a password and
# name no passfile/service/sslkey/sslcert/sslpassword, and every connection is checked with
# PQconnectionUsedPassword on the server actually reached (multi-host conninfos fall through
# to the next host). Superusers may register anything.
#
# The peer asks for a scram-sha-256 password from role "app" on 127.0.0.1 and trusts
# everything else (its Unix socket, other roles on TCP): the trust paths stand for peer
# authentication, a password file or a certificate -- the server's own identity.

use strict;
use warnings FATAL => 'all';

use File::Temp qw(tempdir);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my ($peer) = PeerpoolFleet::peers(1, conf => <<'EOC');
password_encryption = 'scram-sha-256'
log_connections = on
log_statement = 'all'
EOC
$peer->safe_psql('postgres', "CREATE ROLE app LOGIN PASSWORD 'apppw'");
open my $hba, '>', $peer->data_dir . '/pg_hba.conf' or die $!;
print $hba "local all all trust\n"
  . "host all app 127.0.0.1/32 scram-sha-256\n"
  . "host all all 127.0.0.1/32 trust\n";
close $hba;
$peer->reload;

my $superuser = getpwuid($<) // $ENV{USER};
my ($psock, $pport) = ($peer->host, $peer->port);

# The server's own password file: libpq in the coordinator finds app's password there (the
# issue's "~postgres/.pgpass"; PGPASSFILE keeps this test away from the real home directory).
my $secrets = tempdir(CLEANUP => 1);
my $pgpass = "$secrets/pgpass";
open my $pf, '>', $pgpass or die $!;
print $pf "127.0.0.1:$pport:*:app:apppw\n";
close $pf;
chmod 0600, $pgpass;
$ENV{PGPASSFILE} = $pgpass;

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '200ms'
peerpool.reconnect_backoff_initial = '100ms'
peerpool.reconnect_backoff_max = '500ms'
log_connections = on
log_statement = 'all'
EOC
delete $ENV{PGPASSFILE};

$coord->safe_psql('postgres', <<'EOS');
CREATE ROLE r_add LOGIN;
CREATE ROLE r_pq LOGIN;
GRANT USAGE ON SCHEMA peerpool TO r_add, r_pq;
GRANT EXECUTE ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean),
                          peerpool.pool_alter_node(text, text, integer, integer, text, integer, boolean)
   TO r_add;
GRANT EXECUTE ON FUNCTION peerpool.parallel_query(text, text[], integer) TO r_pq;
EOS

sub as_role
{
	my ($role, $sql) = @_;
	return PeerpoolFleet::psql_error($coord, "SET ROLE $role;\n$sql");
}

sub add_sql
{
	my ($name, $conninfo) = @_;
	return sprintf('SELECT peerpool.pool_add_node(%s, %s, min_connections => 1, max_connections => 2)',
		PeerpoolFleet::quote($name), PeerpoolFleet::quote($conninfo));
}

# ---- 1. The four ways in from the issue are refused at registration ----------------------
my %paths = (
	coord_socket => sprintf('host=%s port=%d dbname=postgres', $coord->host, $coord->port),
	peer_socket  => "host=$psock port=$pport dbname=postgres user=$superuser",
	passfile     => "host=127.0.0.1 port=$pport dbname=postgres user=app passfile=$pgpass",
	pgpass       => "host=127.0.0.1 port=$pport dbname=postgres user=app",
);
for my $name (sort keys %paths)
{
	my ($ret, $err) = as_role('r_add', add_sql($name, $paths{$name}));
	isnt($ret, 0, "$name: registration by a non-superuser is refused");
	like($err, qr/28000.*password is required/, "$name: 28000 password is required");
	like($err, qr/HINT:/, "$name: with a hint");
	unlike($err, qr/apppw/, "$name: the error quotes no secret");
}
is($coord->safe_psql('postgres', 'SELECT count(*) FROM peerpool.node'), '0',
	'none of the four was stored');
# So r_pq cannot run anything as the server's identity through them.
my ($ret, $err) = as_role('r_pq',
	q{SELECT * FROM peerpool.parallel_query('SELECT current_user', ARRAY['coord_socket'])});
like($err, qr/42704/, 'parallel_query on the refused name: no such node');

# ---- 2. Accepted with a real password over scram-sha-256 ---------------------------------
($ret, $err) = as_role('r_add',
	add_sql('app_scram', "host=127.0.0.1 port=$pport dbname=postgres user=app password=apppw application_name=app_scram"));
is($ret, 0, 'a non-superuser registers a node with a password') or diag $err;
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"bool_or(node_name = 'app_scram' AND state = 'healthy')", 30),
	30, 'the scram-authenticated node of a non-superuser becomes healthy');
my ($out) = $coord->safe_psql('postgres',
	"SET ROLE r_pq; SELECT result FROM peerpool.parallel_query('SELECT current_user AS u', ARRAY['app_scram'])");
is($out, '[{"u": "app"}]', 'queries run as the password-authenticated role');

# ---- 3. A password in the string is not enough: the server must have asked for it --------
# Same password, but over the peer's trusting Unix socket; a two-host conninfo whose first
# host refuses TCP connections, so libpq falls through to the trusting socket; and the shape
# of CVE-2018-10915: the first host takes the password but is not read-only, so with
# target_session_attrs=read-only libpq moves on to a second server that trusts the socket
# (the coordinator, where app is read-only). Check the connection, not the string.
my $closed = PostgreSQL::Test::Cluster::get_free_port();
$coord->safe_psql('postgres',
	"CREATE ROLE app LOGIN; ALTER ROLE app SET default_transaction_read_only = on");
my %refused = (
	refused_socket => "host=$psock port=$pport dbname=postgres user=app password=apppw",
	refused_super  => "host=$psock port=$pport dbname=postgres user=$superuser password=x",
	refused_multi  => "host=127.0.0.1,$psock port=$closed,$pport dbname=postgres user=app password=apppw",
	refused_tsa    => sprintf('host=127.0.0.1,%s port=%d,%d dbname=postgres user=app password=apppw '
		  . 'target_session_attrs=read-only', $coord->host, $pport, $coord->port),
);
my $peer_log_offset = -s $peer->logfile;
for my $name (sort keys %refused)
{
	($ret, $err) = as_role('r_add', add_sql($name, "$refused{$name} application_name=$name"));
	is($ret, 0, "$name: accepted at registration (the string holds a password)") or diag $err;
}
my $in = "node_name IN ('refused_socket', 'refused_super', 'refused_multi', 'refused_tsa')";
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE $in AND last_sqlstate = '28000' AND last_error LIKE '%password is required%'"
		  . " AND state IN ('unhealthy', 'reconnecting')) = 4", 30),
	30, 'connections that did not use the password fail with 28000');
my $health = $coord->safe_psql('postgres',
	"SELECT node_name, state, last_sqlstate, last_error FROM peerpool.node_health WHERE $in ORDER BY 1");
note "node_health:\n$health";
like($health, qr/HINT/, 'last_error carries the hint');
unlike($health, qr/apppw/, 'last_error quotes no password');
is($coord->safe_psql('postgres',
		"SELECT count(*) FROM peerpool.events WHERE $in AND to_state IN ('healthy', 'degraded')"),
	'0', 'none of them was ever healthy');
my $rows = $coord->safe_psql('postgres',
	"SET ROLE r_pq; SELECT string_agg(node_name || ':' || success, ',' ORDER BY node_name) FROM peerpool.parallel_query('SELECT current_user', ARRAY['refused_socket', 'refused_super', 'refused_multi', 'refused_tsa'])");
is($rows, 'refused_multi:false,refused_socket:false,refused_super:false,refused_tsa:false',
	'parallel_query gets nothing from them');

# The peer saw the connections arrive and leave, but not a single statement from them.
my $peer_log = PeerpoolFleet::log_since($peer, $peer_log_offset);
my @authorized = $peer_log =~ /(connection authorized: .*application_name=refused_\w+)/g;
note sprintf('peer log: %d authorized connections of the refused nodes, e.g. %s',
	scalar @authorized, $authorized[0] // 'none');
my @statements = grep { /refused_\w+ .*statement:/ } split /\n/, $peer_log;
is(join("\n", @statements), '', 'no statement ran on the peer for a refused node');
is($peer->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'refused%' AND state <> 'starting'"),
	'0', 'no session of a refused node is open on the peer');

# ---- 4. Superusers may register the server's identity paths -------------------------------
$coord->safe_psql('postgres',
	add_sql('super_socket', "host=$psock port=$pport dbname=postgres user=app password=apppw application_name=super_socket"));
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"bool_or(node_name = 'super_socket' AND state = 'healthy')", 30),
	30, "a superuser's node over the trusting socket is healthy");

# ---- 5. A non-superuser setting a superuser's conninfo makes it subject to the rule -------
# Exactly the string the superuser used: only the owner changes.
($ret, $err) = as_role('r_add',
	"SELECT peerpool.pool_alter_node('super_socket', weight => 5)");
is($ret, 0, 'r_add may change other settings of the node') or diag $err;
($ret, $err) = as_role('r_add', sprintf(
	"SELECT peerpool.pool_alter_node('super_socket', conninfo => %s)",
	PeerpoolFleet::quote("host=$psock port=$pport dbname=postgres user=app password=apppw application_name=super_socket")));
is($ret, 0, 'r_add sets the same conninfo (it holds a password)') or diag $err;
is($coord->safe_psql('postgres',
		"SELECT conninfo_owner || ' ' || password_required FROM peerpool.nodes WHERE node_name = 'super_socket'"),
	'r_add true', 'the node is now owned by r_add and requires a password');
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"bool_or(node_name = 'super_socket' AND last_sqlstate = '28000' AND state IN ('unhealthy', 'reconnecting'))", 30),
	30, 'its connections are recycled and refused');

# ---- 6. A role that stops being a superuser loses the exemption ---------------------------
$coord->safe_psql('postgres', <<"EOS");
CREATE ROLE super2 SUPERUSER;
SET ROLE super2;
@{[ add_sql('super2_socket', "host=$psock port=$pport dbname=postgres user=app application_name=super2_socket") ]};
EOS
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"bool_or(node_name = 'super2_socket' AND state = 'healthy')", 30),
	30, "super2's passwordless node is healthy");
$coord->safe_psql('postgres', 'ALTER ROLE super2 NOSUPERUSER');
# No registry change wakes the pool manager: its periodic registry recheck (10 s) finds it.
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"bool_or(node_name = 'super2_socket' AND last_sqlstate = '28000')", 40),
	40, 'after ALTER ROLE ... NOSUPERUSER the node is refused');

# The coordinator saw the refused_tsa connection, and no statement from it either.
my @coord_statements = grep { /refused_tsa .*statement:/ } split /\n/, slurp_file($coord->logfile);
is(join("\n", @coord_statements), '', 'no statement ran on the second server of refused_tsa');

PeerpoolFleet::check_logs($coord, $peer);
$coord->stop;
$peer->stop;
done_testing();
