# Copyright (c) pg_peerpool contributors
#
# Upgrades (issue 10): a 0.1.0 installation with registered nodes is updated with
# ALTER EXTENSION pg_peerpool UPDATE while the pool manager runs. The nodes survive (catalog
# rows and live health), and the upgraded schema equals a fresh install of the default
# version in another cluster, compared two ways so that whatever later versions add is
# compared too, without this file naming it:
#   1. pg_dump --schema-only --binary-upgrade (the only pg_dump mode that dumps an
#      extension's member objects, with ALTER EXTENSION ADD and initial privileges), with the
#      OIDs and LSNs normalized away;
#   2. the catalog rows of every member object: functions (pg_get_functiondef: arguments,
#      defaults, result, volatility, strictness, SECURITY DEFINER, SET, parallel safety, body),
#      owners and ACLs; relations with kind, options, columns (type, NOT NULL, default),
#      constraints, indexes, triggers, view definitions and ACLs; types; the schema's ACL;
#      pg_init_privs; comments; and the tables registered with pg_extension_config_dump.
use strict;
use warnings FATAL => 'all';

use File::Temp qw(tempdir);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PeerpoolFleet;

# Generous latency thresholds: a busy test machine must not make the peer degraded.
my $conf = "peerpool.health_check_interval = '200ms'\n"
  . "peerpool.reconnect_backoff_initial = '100ms'\n"
  . "peerpool.degraded_latency = '4s'";
my $old = PeerpoolFleet::coordinator('upgraded', conf => $conf, no_extension => 1);
my $fresh = PeerpoolFleet::coordinator('fresh', conf => $conf);
my ($peer) = PeerpoolFleet::peers(1);

my $default_version = $fresh->safe_psql('postgres',
	"SELECT extversion FROM pg_extension WHERE extname = 'pg_peerpool'");
note "default version: $default_version";
isnt($default_version, '0.1.0', 'the default version is newer than 0.1.0');

# 0.1.0 with nodes: a live peer, a node nobody listens on, a disabled one.
$old->safe_psql('postgres', "CREATE EXTENSION pg_peerpool VERSION '0.1.0'");
is( $old->safe_psql('postgres',
		"SELECT extversion FROM pg_extension WHERE extname = 'pg_peerpool'"),
	'0.1.0',
	'0.1.0 installed');
PeerpoolFleet::register($old, { sql_extra => 'min_connections => 2, weight => 7' }, $peer);
$old->safe_psql('postgres',
	"SELECT peerpool.pool_add_node('nobody', 'host=127.0.0.1 port=1 dbname=postgres connect_timeout=1', role => 'standby')"
);
$old->safe_psql('postgres',
	"SELECT peerpool.pool_add_node('off', 'host=127.0.0.1 port=1 password=secret', enabled => false)"
);
ok( defined PeerpoolFleet::wait_for_health($old,
		"count(*) FILTER (WHERE node_name = 'peer1' AND state = 'healthy') = 1 AND count(*) = 3"),
	'0.1.0: the peer is healthy');

# 0.1.0's columns (0.2.0 adds some, e.g. conninfo_owner: existing rows get the extension
# owner, which t/033_upgrade_ownership.pl checks).
my $rows_sql = 'SELECT node_name, conninfo, min_connections, max_connections, role, weight, '
  . 'enabled, created_at, updated_at FROM peerpool.node ORDER BY node_name';
my $nodes_sql = 'SELECT node_name, conninfo, role, weight, min_connections, max_connections, '
  . 'enabled FROM peerpool.nodes ORDER BY node_name';
my $health_sql =
  "SELECT node_name, state, role, state_since FROM peerpool.node_health WHERE node_name = 'peer1'";
my $rows_before = $old->safe_psql('postgres', $rows_sql);
my $nodes_before = $old->safe_psql('postgres', $nodes_sql);
my $health_before = $old->safe_psql('postgres', $health_sql);
my @workers_before = PeerpoolFleet::worker_pids($old);

like(
	$old->safe_psql('postgres',
		"SELECT string_agg(source || '->' || target || ':' || path, ',') FROM pg_extension_update_paths('pg_peerpool') WHERE source = '0.1.0' AND target = '$default_version'"
	),
	qr/^0\.1\.0->\Q$default_version\E:0\.1\.0--/,
	"an update path from 0.1.0 to $default_version exists");

$old->safe_psql('postgres', 'ALTER EXTENSION pg_peerpool UPDATE');
is( $old->safe_psql('postgres',
		"SELECT extversion FROM pg_extension WHERE extname = 'pg_peerpool'"),
	$default_version,
	"ALTER EXTENSION UPDATE reaches $default_version");

# The nodes survive: catalog rows (timestamps included), the masked view, the live state.
is($old->safe_psql('postgres', $rows_sql), $rows_before, 'peerpool.node rows unchanged');
is($old->safe_psql('postgres', $nodes_sql), $nodes_before, 'peerpool.nodes unchanged');
is($old->safe_psql('postgres', $health_sql),
	$health_before, 'the peer is still healthy, in the same state since before the update');
is_deeply([ PeerpoolFleet::worker_pids($old) ],
	\@workers_before, 'the pool manager kept running through the update');
is( $old->safe_psql('postgres',
		"SELECT string_agg(node_name || ':' || state, ',' ORDER BY node_name) FROM peerpool.pool_check_health()"
	  ) =~ s/nobody:\w+/nobody:*/r,
	'nobody:*,off:disconnected,peer1:healthy',
	'pool_check_health() after the update');
is( $old->safe_psql('postgres',
		"SELECT * FROM peerpool.pool_query('SELECT current_setting(''port'')', 'peer1') AS t(port text)"
	),
	$peer->port,
	'pool_query() after the update');
$old->safe_psql('postgres',
	"SELECT peerpool.pool_alter_node('nobody', weight => 3); SELECT peerpool.pool_remove_node('off')");
ok( defined PeerpoolFleet::wait_for_health($old,
		"count(*) = 2 AND count(*) FILTER (WHERE node_name = 'off') = 0"),
	'registry changes still reach the pool manager after the update');

# Every view of the schema can be read after the update (each reaches its C function).
my @views = split /\n/,
  $old->safe_psql('postgres',
	"SELECT c.oid::regclass FROM pg_class c WHERE c.relnamespace = 'peerpool'::regnamespace AND c.relkind = 'v' ORDER BY 1"
  );
for my $view (@views)
{
	my ($ret, $out, $err) = $old->psql('postgres', "SELECT count(*) >= 0 FROM $view");
	is("$ret $out $err", '0 t ', "$view can be read after the update");
}

# The schema: upgraded against fresh.
my $dir = tempdir('peerpool_upgrade_XXXXXX', TMPDIR => 1, CLEANUP => 1);

sub normalized_dump
{
	my ($node) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[
			'pg_dump', '--schema-only', '--binary-upgrade', '--no-comments',
			'-d', $node->connstr('postgres')
		],
		'>', \$out, '2>', \$err) or die "pg_dump failed: $err";
	my @lines;
	for (split /\n/, $out)
	{
		next if /^--/ || /^\s*$/ || /^\\(?:un)?restrict /;
		next if /binary_upgrade_set_next_/;    # OIDs, relfilenodes, attribute LSNs
		s/'\{[0-9,]*\}'/'{OIDS}'/g if /binary_upgrade_create_empty_extension/;
		# pg_class fix-ups: the XIDs depend on how many transactions each server ran
		s/(relfrozenxid|relminmxid) = '\d+'/$1 = 'XID'/g;
		s/WHERE oid = '\d+'/WHERE oid = 'OID'/;
		push @lines, $_;
	}
	return join("\n", @lines) . "\n";
}

my $members_sql = <<'SQL';
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'pg_peerpool'),
members AS (
    SELECT d.classid, d.objid, d.objsubid
      FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
described AS (
    SELECT pg_describe_object(m.classid, m.objid, m.objsubid) AS object,
           concat_ws(E'\n',
             CASE m.classid
             WHEN 'pg_proc'::regclass THEN
               (SELECT concat_ws(E'\n', pg_get_functiondef(p.oid),
                                 'owner ' || pg_get_userbyid(p.proowner),
                                 'acl ' || coalesce(p.proacl::text, 'default'),
                                 'leakproof ' || p.proleakproof)
                  FROM pg_proc p WHERE p.oid = m.objid)
             WHEN 'pg_class'::regclass THEN
               (SELECT concat_ws(E'\n',
                  format('kind %s persistence %s rls %s options %s', c.relkind, c.relpersistence,
                         c.relrowsecurity, coalesce(c.reloptions::text, '-')),
                  'owner ' || pg_get_userbyid(c.relowner),
                  'acl ' || coalesce(c.relacl::text, 'default'),
                  (SELECT string_agg(format('column %s %s notnull=%s default=%s identity=%s generated=%s collation=%s acl=%s',
                                            a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                                            pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
                                            a.attcollation::regcollation, a.attacl),
                                     E'\n' ORDER BY a.attnum)
                     FROM pg_attribute a
                     LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                  (SELECT string_agg(format('constraint %s %s', co.contype, pg_get_constraintdef(co.oid)),
                                     E'\n' ORDER BY co.contype, pg_get_constraintdef(co.oid))
                     FROM pg_constraint co WHERE co.conrelid = c.oid),
                  (SELECT string_agg('index ' || regexp_replace(pg_get_indexdef(i.indexrelid), 'INDEX \S+ ON', 'INDEX ON'),
                                     E'\n' ORDER BY pg_get_indexdef(i.indexrelid))
                     FROM pg_index i WHERE i.indrelid = c.oid),
                  (SELECT string_agg('trigger ' || pg_get_triggerdef(t.oid), E'\n' ORDER BY t.tgname)
                     FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal),
                  (SELECT string_agg('policy ' || format('%s %s %s %s %s', pol.polname, pol.polcmd,
                                     pol.polroles::text, pg_get_expr(pol.polqual, pol.polrelid),
                                     pg_get_expr(pol.polwithcheck, pol.polrelid)), E'\n' ORDER BY pol.polname)
                     FROM pg_policy pol WHERE pol.polrelid = c.oid),
                  CASE WHEN c.relkind IN ('v', 'm') THEN 'view ' || pg_get_viewdef(c.oid, true) END)
                  FROM pg_class c WHERE c.oid = m.objid)
             WHEN 'pg_type'::regclass THEN
               (SELECT concat_ws(' ', 'type', t.typtype, format_type(t.oid, NULL),
                                 'owner', pg_get_userbyid(t.typowner), 'acl', coalesce(t.typacl::text, 'default'))
                  FROM pg_type t WHERE t.oid = m.objid)
             WHEN 'pg_namespace'::regclass THEN
               (SELECT 'acl ' || coalesce(n.nspacl::text, 'default') FROM pg_namespace n WHERE n.oid = m.objid)
             END,
             'comment ' || obj_description(m.objid, m.classid::regclass::name),
             (SELECT string_agg(format('init_privs %s %s', ip.privtype, ip.initprivs), E'\n' ORDER BY ip.objsubid)
                FROM pg_init_privs ip WHERE ip.classoid = m.classid AND ip.objoid = m.objid)) AS detail
      FROM members m)
SELECT string_agg('== ' || object || E'\n' || detail, E'\n' ORDER BY object)
  FROM described
UNION ALL
SELECT 'config_dump ' || coalesce(string_agg(cfg.rel::regclass::text || ' ' || quote_literal(cfg.cond), ', ' ORDER BY cfg.rel::regclass::text), 'none')
  FROM pg_extension e
  LEFT JOIN LATERAL unnest(e.extconfig, e.extcondition) AS cfg(rel, cond) ON true
 WHERE e.extname = 'pg_peerpool'
UNION ALL
SELECT 'schema objects not owned by the extension: ' || coalesce(string_agg(o, ', ' ORDER BY o), 'none')
  FROM (SELECT c.oid::regclass::text AS o FROM pg_class c
         WHERE c.relnamespace = 'peerpool'::regnamespace AND c.relkind NOT IN ('i', 't', 'S')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype = 'e')
        UNION ALL
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'peerpool'::regnamespace
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')) s
SQL

sub compare
{
	my ($what, $upgraded, $fresh_text) = @_;
	my $a = "$dir/$what.upgraded";
	my $b = "$dir/$what.fresh";
	PostgreSQL::Test::Utils::append_to_file($a, $upgraded);
	PostgreSQL::Test::Utils::append_to_file($b, $fresh_text);
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'diff', '-u', $b, $a ], '>', \$out, '2>', \$err);
	is($out, '', "$what: upgraded 0.1.0 equals a fresh $default_version install")
	  or diag "--- fresh, +++ upgraded:\n$out";
	return;
}

my $dump_fresh = normalized_dump($fresh);
my $dump_upgraded = normalized_dump($old);
like($dump_fresh, qr/ALTER EXTENSION pg_peerpool ADD FUNCTION peerpool\.pool_add_node/,
	'the dump holds the extension\'s member objects');
compare('pg_dump', $dump_upgraded, $dump_fresh);

my $catalog_fresh = $fresh->safe_psql('postgres', $members_sql);
my $catalog_upgraded = $old->safe_psql('postgres', $members_sql);
like($catalog_fresh, qr/config_dump peerpool\.node ''/,
	'the catalog listing holds the pg_extension_config_dump table');
like($catalog_fresh, qr/schema objects not owned by the extension: none/,
	'a fresh install leaves nothing in the schema outside the extension');
compare('catalog', $catalog_upgraded, $catalog_fresh);
note sprintf('compared %d dump lines and %d catalog lines',
	scalar(split /\n/, $dump_fresh), scalar(split /\n/, $catalog_fresh));

PeerpoolFleet::check_logs($old, $fresh, $peer);
done_testing();
