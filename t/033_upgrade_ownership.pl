# Copyright (c) pg_peerpool contributors

# The 0.1.0 -> 0.2.0 update of issue 8's objects: nodes registered before the update become
# owned by the extension's owner (a superuser) and keep working; until the update, the 0.1.0
# SECURITY DEFINER registry functions are refused to sessions that are not superusers (they
# cannot tell who called them); the updated objects equal a fresh 0.2.0 install.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use PeerpoolFleet;

my ($peer) = PeerpoolFleet::peers(1);
my $old = PeerpoolFleet::coordinator('old', no_extension => 1,
	conf => "peerpool.health_check_interval = '200ms'");
my $fresh = PeerpoolFleet::coordinator('fresh');
my $superuser = getpwuid($<) // $ENV{USER};

$old->safe_psql('postgres', "CREATE EXTENSION pg_peerpool VERSION '0.1.0'");
$old->safe_psql('postgres', sprintf("SELECT peerpool.pool_add_node('before', %s)",
		PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($peer))));
PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($old, "bool_or(node_name = 'before' AND state = 'healthy')", 30),
	30, '0.1.0 catalog, 0.2.0 library: a superuser registers a node');

$old->safe_psql('postgres', <<'EOS');
CREATE ROLE r_add LOGIN;
GRANT USAGE ON SCHEMA peerpool TO r_add;
GRANT EXECUTE ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean)
   TO r_add;
EOS
my ($ret, $err) = PeerpoolFleet::psql_error($old,
	"SET ROLE r_add; SELECT peerpool.pool_add_node('sneaky', 'host=/tmp')");
like($err, qr/55000.*older than its library/s, 'before the update a non-superuser is refused (55000)');
like($err, qr/ALTER EXTENSION pg_peerpool UPDATE/, 'the hint names the update');

$old->safe_psql('postgres', "ALTER EXTENSION pg_peerpool UPDATE TO '0.2.0'");
is($old->safe_psql('postgres',
		"SELECT conninfo_owner::text = (SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'pg_peerpool')"
		  . " AND NOT password_required FROM peerpool.nodes WHERE node_name = 'before'"),
	't', 'the existing node is owned by the extension owner and needs no password');
is($old->safe_psql('postgres',
		"SELECT state FROM peerpool.pool_check_health('before')"), 'healthy',
	'it stays healthy after the update');
($ret, $err) = PeerpoolFleet::psql_error($old,
	"SET ROLE r_add; SELECT peerpool.pool_add_node('sneaky', 'host=/tmp')");
like($err, qr/28000.*password is required/s, 'after the update the password rule applies');

# The objects of this topic are the same as in a fresh install (without this test's grant).
$old->safe_psql('postgres', 'REVOKE ALL ON FUNCTION peerpool.pool_add_node(text, text, integer, integer, text, integer, boolean) FROM r_add');
my $describe = <<'EOS';
SELECT 'column ' || attnum || ' ' || attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull
  FROM pg_attribute WHERE attrelid = 'peerpool.node'::regclass AND attnum > 0 AND NOT attisdropped
UNION ALL
SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE conrelid = 'peerpool.node'::regclass
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'peerpool.node'::regclass
UNION ALL
SELECT 'function ' || oid::regprocedure || ' secdef=' || prosecdef || ' config=' || coalesce(proconfig::text, '')
       || ' acl=' || coalesce(proacl::text, '')
  FROM pg_proc WHERE pronamespace = 'peerpool'::regnamespace
UNION ALL
SELECT 'view ' || pg_get_viewdef('peerpool.nodes'::regclass)
ORDER BY 1
EOS
my $owner_old = $old->safe_psql('postgres', 'SELECT extowner::regrole FROM pg_extension');
my $owner_fresh = $fresh->safe_psql('postgres', 'SELECT extowner::regrole FROM pg_extension');
is($owner_old, $owner_fresh, 'both installed by the same superuser');
is($old->safe_psql('postgres', $describe), $fresh->safe_psql('postgres', $describe),
	'upgraded peerpool.node, its constraints and triggers, the functions and peerpool.nodes equal a fresh 0.2.0 install');

PeerpoolFleet::check_logs($old, $fresh, $peer);
$_->stop for ($old, $fresh, $peer);
done_testing();
