# Copyright (c) pg_peerpool contributors

# Results arrive exactly as the node sent them (SPEC section 5, issue 9): every pooled
# connection uses this database's encoding as client_encoding, so a LATIN1 peer's text comes
# back converted and text it cannot convert fails that node (22P05); an SQL_ASCII peer, which
# converts nothing, has its bytes checked here, and invalid ones fail that node (22021) --
# never invalid bytes in jsonb, a tuple or a table. Both directions: a UTF8 coordinator over
# LATIN1, SQL_ASCII and UTF8 peers, and a LATIN1 coordinator over a UTF8 peer.
#
# Non-ASCII text is made inside the servers with chr() (233 = e-acute, 255 = y-diaeresis,
# 937 = Omega), and expected output is written as UTF-8 bytes, so this file is plain ASCII.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use PeerpoolFleet;

# A cluster of the given encoding (locale C), on 127.0.0.1 too; optionally preloading us.
sub cluster
{
	my ($name, $encoding, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(extra => [ "--encoding=$encoding", '--locale=C' ]);
	$node->append_conf('postgresql.conf', "listen_addresses = '127.0.0.1'")
	  if $PostgreSQL::Test::Utils::use_unix_sockets;
	if ($opts{coordinator})
	{
		$node->append_conf('postgresql.conf', <<'EOC');
shared_preload_libraries = 'pg_peerpool'
peerpool.health_check_interval = '500ms'
peerpool.reset_query = 'DISCARD ALL'
EOC
	}
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION pg_peerpool') if $opts{coordinator};
	return $node;
}

my $coord = cluster('coord', 'UTF8', coordinator => 1);
my $latin = cluster('latin', 'LATIN1');
my $ascii = cluster('ascii', 'SQL_ASCII');
my $utf8  = cluster('utf8', 'UTF8');

# 'cafe ÿ' with the accents, as each server spells it: chr() takes the code point in UTF8 and
# LATIN1 databases. The SQL_ASCII peer stores the UTF-8 bytes of it (what a UTF8 client sends)
# and, in a second row, bytes that are not UTF-8 at all.
my $cafe_sql = q{'caf' || chr(233) || ' ' || chr(255)};
my $cafe     = "caf\xc3\xa9 \xc3\xbf";    # the UTF-8 bytes psql prints
for my $peer ($latin, $utf8)
{
	$peer->safe_psql('postgres',
		"CREATE TABLE t (id int, s text); INSERT INTO t VALUES (1, $cafe_sql)");
}
$utf8->safe_psql('postgres', 'INSERT INTO t VALUES (2, chr(937))');
$ascii->safe_psql('postgres',
	    "CREATE TABLE t (id int, s text); "
	  . "INSERT INTO t VALUES (1, convert_from('\\x636166c3a920c3bf', 'SQL_ASCII')), "
	  . "(2, convert_from('\\xc328ff41', 'SQL_ASCII'))");
is($ascii->safe_psql('postgres', 'SELECT encode(convert_to(s, \'SQL_ASCII\'), \'hex\') FROM t ORDER BY id'),
	"636166c3a920c3bf\nc328ff41", 'the SQL_ASCII peer holds the raw bytes');

PeerpoolFleet::register($coord, $latin, $ascii, $utf8);
ok( defined PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE state = 'healthy') = 3"),
	'three peers healthy');

sub run_sql
{
	my ($node, $sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

# ---- client_encoding ---------------------------------------------------------------------

is( run_sql($coord,
		q{SELECT string_agg(node_name || '=' || (result -> 0 ->> 'enc'), ' ' ORDER BY node_name)
		    FROM peerpool.parallel_query('SELECT current_setting(''client_encoding'') AS enc')}),
	'ascii=UTF8 latin=UTF8 utf8=UTF8',
	'every pooled connection uses the local database encoding as client_encoding');

# ---- round trips of 'cafe ÿ' ---------------------------------------------------------------

# In the query text: the LATIN1 peer sees 6 characters (it used to see the 8 UTF-8 bytes as
# 8 LATIN1 characters).
my $literal = qq{format('SELECT %L AS s, length(%L) AS len', $cafe_sql, $cafe_sql)};
is( run_sql($coord,
		qq{SELECT string_agg(node_name || ' ' || success || ' ' || (result -> 0 ->> 's') || ' '
		                     || (result -> 0 ->> 'len'), E'\\n' ORDER BY node_name)
		     FROM peerpool.parallel_query($literal, ARRAY['latin', 'utf8'])}),
	"latin true $cafe 6\nutf8 true $cafe 6",
	'parallel_query: a literal in the query text round-trips through a LATIN1 peer');
is( run_sql($coord,
		qq{SELECT string_agg(node || ' ' || s || ' ' || len, E'\\n' ORDER BY node)
		     FROM peerpool.parallel_query_rows($literal, ARRAY['latin', 'ascii', 'utf8'])
		       AS t(node text, s text, len int)}),
	# SQL_ASCII counts bytes: 8 for the 6 characters.
	"ascii $cafe 8\nlatin $cafe 6\nutf8 $cafe 6",
	'parallel_query_rows: the literal round-trips through LATIN1, SQL_ASCII and UTF8 peers');
is( run_sql($coord,
		qq{SELECT s || ' ' || len FROM peerpool.pool_query($literal, 'latin') AS t(s text, len int)}),
	"$cafe 6", 'pool_query: the literal round-trips through a LATIN1 peer');

# Table data: converted from LATIN1 (it used to arrive as the raw LATIN1 byte 0xe9).
is( run_sql($coord,
		qq{SELECT string_agg(node_name || ' ' || success || ' ' || (result -> 0 ->> 's')
		                     || ' ' || ((result -> 0 ->> 's') = $cafe_sql), E'\\n' ORDER BY node_name)
		     FROM peerpool.parallel_query('SELECT s FROM t WHERE id = 1')}),
	"ascii true $cafe true\nlatin true $cafe true\nutf8 true $cafe true",
	'parallel_query: table data of every peer arrives as valid UTF-8, equal to the local string');
run_sql($coord,
	qq{CREATE TABLE copied AS SELECT * FROM peerpool.pool_query('SELECT s FROM t WHERE id = 1', 'latin')
	     AS t(s text)});
is( run_sql($coord,
		qq{SELECT s = $cafe_sql, octet_length(s), length(s), convert_to(s, 'UTF8') = convert_to($cafe_sql, 'UTF8') FROM copied}),
	"t|8|6|t", 'pool_query: LATIN1 table data stored locally is valid UTF-8');
is( run_sql($coord,
		qq{SELECT string_agg(node || ' ' || (s = $cafe_sql), ' ' ORDER BY node)
		     FROM peerpool.parallel_query_rows('SELECT s FROM t WHERE id = 1') AS t(node text, s text)}),
	'ascii true latin true utf8 true', 'parallel_query_rows: table data of every peer, converted');

# ---- what a peer cannot convert fails that node (22P05) ------------------------------------

# Omega has no LATIN1 equivalent: the LATIN1 peer refuses the query text; the others answer.
my $omega = q{format('SELECT %L AS s', chr(937))};
my $out = run_sql($coord,
	qq{SELECT string_agg(node_name || ' ' || success || ' ' || coalesce(error, result::text), E'\\n' ORDER BY node_name)
	     FROM peerpool.parallel_query($omega)});
like($out, qr/^latin false .*has no equivalent in encoding "LATIN1" \[SQLSTATE 22P05\]$/m,
	'parallel_query: query text the LATIN1 peer cannot convert fails that node with 22P05');
like($out, qr/^utf8 true \[\{"s": "\xce\xa9"\}\]$/m, 'parallel_query: ... the UTF8 peer answers');
like($out, qr/^ascii true \[\{"s": "\xce\xa9"\}\]$/m, 'parallel_query: ... the SQL_ASCII peer answers');

my ($rc, $stdout, $stderr) = $coord->psql('postgres',
	qq{SELECT * FROM peerpool.pool_query($omega, 'latin') AS t(s text)},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($stderr, qr/ERROR:  22P05: node "latin": character with byte sequence 0xce 0xa9 in encoding "UTF8" has no equivalent in encoding "LATIN1"/,
	'pool_query: the same query is a 22P05 error naming the node');

($rc, $stdout, $stderr) = $coord->psql('postgres',
	qq{SELECT node, s FROM peerpool.parallel_query_rows($omega) AS t(node text, s text) ORDER BY node});
is($stdout, "ascii|\xce\xa9\nutf8|\xce\xa9", 'parallel_query_rows: the other nodes\' rows return');
like($stderr, qr/WARNING:  node "latin": character with byte sequence 0xce 0xa9 .* \[SQLSTATE 22P05\]/,
	'parallel_query_rows: ... with a warning naming the node and its SQLSTATE');

# ---- an SQL_ASCII peer's invalid bytes fail that node (22021) ------------------------------

# Asked for UTF8, the SQL_ASCII peer checks what it sends itself and refuses the bytes.
$out = run_sql($coord,
	qq{SELECT string_agg(node_name || ' ' || success || ' ' || coalesce(error, result::text), E'\\n' ORDER BY node_name)
	     FROM peerpool.parallel_query('SELECT id, s FROM t ORDER BY id')});
like($out, qr/^ascii false invalid byte sequence for encoding "UTF8": 0xc3 0x28 \[SQLSTATE 22021\]$/m,
	'parallel_query: invalid UTF-8 on an SQL_ASCII peer fails that node with 22021');
like($out, qr/^latin true \[\{"s": "\Q$cafe\E", "id": 1\}\]$/m, 'parallel_query: ... the LATIN1 peer answers');
like($out, qr/^utf8 true \[\{"s": "\Q$cafe\E", "id": 1\}, \{"s": "\xce\xa9", "id": 2\}\]$/m,
	'parallel_query: ... the UTF8 peer answers');
($rc, $stdout, $stderr) = $coord->psql('postgres',
	q{CREATE TABLE bad AS SELECT * FROM peerpool.pool_query('SELECT s FROM t', 'ascii') AS t(s text)},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($stderr, qr/ERROR:  22021: node "ascii": invalid byte sequence for encoding "UTF8": 0xc3 0x28/,
	'pool_query: ... is a 22021 error naming the node; nothing is stored');

# A query that changes client_encoding itself gets its bytes unconverted: they are checked
# here, so invalid ones still fail the node and never land in jsonb, a tuple or a table.
my $raw = q{SET client_encoding = ''SQL_ASCII''; SELECT id, s FROM t ORDER BY id};
$out = run_sql($coord,
	qq{SELECT string_agg(node_name || ' ' || success || ' ' || coalesce(error, result::text), E'\\n' ORDER BY node_name)
	     FROM peerpool.parallel_query('$raw', ARRAY['ascii', 'utf8'])});
like($out,
	qr/^ascii false node "ascii": column "s": invalid byte sequence for encoding "UTF8": 0xc3 0x28 \[SQLSTATE 22021\]$/m,
	'parallel_query: unconverted invalid bytes fail the node with 22021, naming node and column');
like($out, qr/^utf8 true \[\{"s": "\Q$cafe\E", "id": 1\}, \{"s": "\xce\xa9", "id": 2\}\]$/m,
	'parallel_query: ... valid UTF-8 bytes are fine');
$out = run_sql($coord,
	q{SELECT error FROM peerpool.parallel_query('SET client_encoding = ''LATIN1''; SELECT s FROM t WHERE id = 1', ARRAY['utf8'])});
is($out, 'node "utf8": column "s": invalid byte sequence for encoding "UTF8": 0xe9 0x20 0xff [SQLSTATE 22021]',
	'parallel_query: LATIN1 bytes from a UTF8 peer that switched client_encoding fail the node');
is( run_sql($coord,
		q{SELECT string_agg(DISTINCT result -> 0 ->> 'enc', ' ') FROM peerpool.parallel_query(
		    'SELECT current_setting(''client_encoding'') AS enc', ARRAY['ascii', 'utf8'])}),
	'UTF8', 'the next call on those connections has client_encoding UTF8 again (DISCARD ALL)');

($rc, $stdout, $stderr) = $coord->psql('postgres',
	qq{CREATE TABLE bad AS SELECT * FROM peerpool.pool_query('$raw', 'ascii') AS t(id int, s text)},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($stderr,
	qr/ERROR:  22021: node "ascii": invalid byte sequence for encoding "UTF8": 0xc3 0x28\nCONTEXT:  pool_query: column 2 \("s"\) of the result from node "ascii"/,
	'pool_query: unconverted invalid bytes are a 22021 error naming node and column');
is(run_sql($coord, q{SELECT to_regclass('bad') IS NULL}), 't', 'pool_query: ... nothing stored');

($rc, $stdout, $stderr) = $coord->psql('postgres',
	qq{SELECT node, id FROM peerpool.parallel_query_rows('$raw', ARRAY['ascii', 'utf8']) AS t(node text, id int, s text) ORDER BY node, id});
is($stdout, "utf8|1\nutf8|2",
	'parallel_query_rows: the failed node\'s rows (even its valid first one) are dropped, the others return');
like($stderr, qr/WARNING:  node "ascii": column 2 \("s"\): invalid byte sequence for encoding "UTF8": 0xc3 0x28 \[SQLSTATE 22021\]/,
	'parallel_query_rows: ... with a warning naming node, column and SQLSTATE');
($rc, $stdout, $stderr) = $coord->psql('postgres',
	qq{SELECT * FROM peerpool.parallel_query_rows('$raw', on_error => 'error') AS t(node text, id int, s text)});
# Every node is asked; the first failure to arrive is raised (the LATIN1 peer's bytes are
# invalid UTF8 too).
like($stderr, qr/ERROR:  node "(ascii|latin)": column 2 \("s"\): invalid byte sequence/,
	'parallel_query_rows: on_error => error raises it');

# Invalid bytes in a column name fail the node too; in a remote message they are replaced.
$ascii->safe_psql('postgres',
	q{DO $$ BEGIN EXECUTE format('CREATE VIEW v AS SELECT 1 AS %I', convert_from('\xc328', 'SQL_ASCII')); END $$});
is( run_sql($coord,
		q{SELECT success || ' ' || error FROM peerpool.parallel_query('SET client_encoding = ''SQL_ASCII''; SELECT * FROM v', ARRAY['ascii'])}),
	'false node "ascii": name of column 1: invalid byte sequence for encoding "UTF8": 0xc3 0x28 [SQLSTATE 22021]',
	'parallel_query: a column name in invalid UTF-8 fails the node with 22021');
$out = run_sql($coord,
	q{SELECT error FROM peerpool.parallel_query($q$SET client_encoding = 'SQL_ASCII'; DO $x$ BEGIN RAISE EXCEPTION '%', (SELECT s FROM t WHERE id = 2); END $x$$q$, ARRAY['ascii'])});
is($out, '?(?A [SQLSTATE P0001]', 'invalid bytes in a remote error message are replaced by ?');

# ---- a LATIN1 coordinator over a UTF8 peer ---------------------------------------------------

my $coord2 = cluster('coord2', 'LATIN1', coordinator => 1);
$coord2->safe_psql('postgres',
	sprintf("SELECT peerpool.pool_add_node('utf8', %s)",
		PeerpoolFleet::quote(PeerpoolFleet::peer_conninfo($utf8))));
ok( defined PeerpoolFleet::wait_for_health($coord2, "count(*) FILTER (WHERE state = 'healthy') = 1"),
	'LATIN1 coordinator: peer healthy');
# psql prints LATIN1 bytes here (client_encoding = server encoding).
is( run_sql($coord2,
		qq{SELECT (result -> 0 ->> 's') = $cafe_sql, octet_length(result -> 0 ->> 's')
		     FROM peerpool.parallel_query('SELECT s FROM t WHERE id = 1')}),
	't|6', 'LATIN1 coordinator: UTF8 table data arrives converted to LATIN1');
$out = run_sql($coord2,
	q{SELECT success || ' ' || error FROM peerpool.parallel_query('SELECT s FROM t ORDER BY id')});
like($out, qr/^false character with byte sequence 0xce 0xa9 in encoding "UTF8" has no equivalent in encoding "LATIN1" \[SQLSTATE 22P05\]$/,
	'LATIN1 coordinator: a value the peer cannot convert fails the node with 22P05');
($rc, $stdout, $stderr) = $coord2->psql('postgres',
	q{CREATE TABLE copied AS SELECT * FROM peerpool.pool_query('SELECT s FROM t', 'utf8') AS t(s text)});
like($stderr, qr/ERROR:  node "utf8": character with byte sequence 0xce 0xa9 in encoding "UTF8" has no equivalent in encoding "LATIN1"/,
	'LATIN1 coordinator: pool_query of it is an error, nothing is stored');

PeerpoolFleet::check_logs($coord, $coord2, $latin, $ascii, $utf8);
done_testing();
