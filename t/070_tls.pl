# Copyright (c) pg_peerpool contributors

# A real fleet (issue 11 item 4): TLS to the peers. A test CA made with the openssl CLI in the
# test's own directory signs a server certificate for CN localhost (SAN DNS:localhost and
# IP:127.0.0.1); a second, unrelated CA signs nothing we use.
#
# - sslmode=verify-full with the right sslrootcert works, by name (host=localhost
#   hostaddr=127.0.0.1) and by address (host=127.0.0.1): healthy, pool_query and parallel_query
#   answer, 100,000 rows (about 14 MB) arrive intact (count and md5 equal to the peer's own), and
#   the peer shows every pooled session in pg_stat_ssl with ssl = true.
# - sslmode=require to a peer with ssl = off is refused: the node is unhealthy and last_error
#   says the server does not support SSL.
# - sslmode=verify-full with the wrong CA is refused: unhealthy, "certificate verify failed".
# The nodes are registered by a superuser, so no password is needed (SPEC section 2).

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use PeerpoolFleet;

my $openssl = $ENV{OPENSSL} // 'openssl';
plan skip_all => 'openssl CLI not found' if system("$openssl version >/dev/null 2>&1") != 0;

# ---------------------------------------------------------------------------------------
# Certificates

my $dir = PostgreSQL::Test::Utils::tempdir('tls');

sub openssl
{
	my (@args) = @_;
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ $openssl, @args ], '<', \undef, '>', \$out, '2>', \$err);
	BAIL_OUT("openssl @args failed: $err") unless $ok;
	return $out;
}

# EC P-256 keys: quick to make, accepted by every supported OpenSSL.
my @ec = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1');
for my $ca ('ca', 'other_ca')
{
	openssl('req', '-new', '-x509', '-nodes', '-days', '2', @ec,
		'-keyout', "$dir/$ca.key", '-out', "$dir/$ca.crt", '-subj', "/CN=pg_peerpool test $ca");
}
openssl('req', '-new', '-nodes', @ec, '-keyout', "$dir/server.key", '-out', "$dir/server.csr",
	'-subj', '/CN=localhost');
open my $fh, '>', "$dir/server.ext" or die $!;
print $fh "subjectAltName = DNS:localhost, IP:127.0.0.1\n";
close $fh;
openssl('x509', '-req', '-in', "$dir/server.csr", '-CA', "$dir/ca.crt", '-CAkey', "$dir/ca.key",
	'-CAcreateserial', '-days', '2', '-extfile', "$dir/server.ext", '-out', "$dir/server.crt");
chmod 0600, "$dir/server.key", "$dir/ca.key", "$dir/other_ca.key";
like(openssl('x509', '-in', "$dir/server.crt", '-noout', '-subject', '-ext', 'subjectAltName'),
	qr/CN\s*=\s*localhost.*DNS:localhost, IP Address:127\.0\.0\.1/s,
	'server certificate: CN localhost, SAN DNS:localhost and IP 127.0.0.1');
like(openssl('verify', '-CAfile', "$dir/ca.crt", "$dir/server.crt"), qr/: OK/, 'signed by the test CA');

# ---------------------------------------------------------------------------------------
# Peers and coordinator

my ($tls) = PeerpoolFleet::peers(1, prefix => 'tls', conf => <<"EOC");
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
EOC
my ($plain) = PeerpoolFleet::peers(1, prefix => 'plain', conf => 'ssl = off');
is($tls->safe_psql('postgres', 'SHOW ssl'), 'on', 'peer tls1 has ssl = on');

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '500ms'
peerpool.degraded_latency = '2s'
peerpool.connect_timeout = '5s'
EOC

my $user = getpwuid($<) // $ENV{USER};
my %conninfo = (
	by_name => sprintf('host=localhost hostaddr=127.0.0.1 port=%d dbname=postgres user=%s sslmode=verify-full sslrootcert=%s',
		$tls->port, $user, "$dir/ca.crt"),
	by_ip => sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s sslmode=verify-full sslrootcert=%s',
		$tls->port, $user, "$dir/ca.crt"),
	no_tls_peer => sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s sslmode=require',
		$plain->port, $user),
	wrong_ca => sprintf('host=localhost hostaddr=127.0.0.1 port=%d dbname=postgres user=%s sslmode=verify-full sslrootcert=%s',
		$tls->port, $user, "$dir/other_ca.crt"));
for my $name (sort keys %conninfo)
{
	$coord->safe_psql('postgres', sprintf('SELECT peerpool.pool_add_node(%s, %s, min_connections => 1, max_connections => 2)',
		PeerpoolFleet::quote($name), PeerpoolFleet::quote($conninfo{$name})));
}

# ---------------------------------------------------------------------------------------
# verify-full with the right CA

PeerpoolFleet::timed_ok(
	PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name IN ('by_name', 'by_ip') AND state = 'healthy') = 2", 30),
	30, 'verify-full, by name and by address: healthy');

for my $n ('by_name', 'by_ip')
{
	is( $coord->safe_psql('postgres', sprintf(
				q{SELECT * FROM peerpool.pool_query(
				'SELECT s.ssl, s.version IS NOT NULL FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()', '%s')
				AS t(ssl boolean, has_version boolean)}, $n)),
		't|t', "$n: pool_query runs in a TLS session (pg_stat_ssl on the peer)");
}
is( $coord->safe_psql('postgres',
		q{SELECT string_agg(node_name || ':' || success || ':' || coalesce(result::text, ''), ' ' ORDER BY node_name)
		  FROM peerpool.parallel_query('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()', ARRAY['by_name', 'by_ip'])}),
	'by_ip:true:[{"ssl": true}] by_name:true:[{"ssl": true}]',
	'parallel_query over both TLS nodes');

# Every session of ours on the TLS peer is encrypted (checks and pooled connections alike).
my $sessions = $tls->safe_psql('postgres',
	q{SELECT count(*) || '|' || bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
	  WHERE a.application_name = 'pg_peerpool'});
like($sessions, qr/^[1-9]\d*\|true$/, "every pooled session on the TLS peer has ssl = true ($sessions)");

# A large result through TLS, compared with the peer's own answer.
my $big = q{SELECT g AS i, md5(g::text) || repeat('x', 100) AS payload FROM generate_series(1, 100000) g};
my $digest = q{count(*) || '|' || md5(string_agg(i || ',' || payload, ';' ORDER BY i))};
my $expected = $tls->safe_psql('postgres', "SELECT $digest FROM ($big) t");
like($expected, qr/^100000\|[0-9a-f]{32}$/, 'the peer\'s own answer: 100,000 rows');
for my $n ('by_name', 'by_ip')
{
	my ($secs, $got) = PeerpoolFleet::timed_psql($coord, sprintf(
		q{SELECT %s FROM peerpool.pool_query(%s, '%s') AS t(i int, payload text)},
		$digest, PeerpoolFleet::quote($big), $n));
	is($got, $expected, "$n: 100,000 rows (about 14 MB) over TLS arrive intact (count and md5)");
	note sprintf('%s: 100,000 rows over TLS in %.2f s', $n, $secs);
}
my ($secs, $got) = PeerpoolFleet::timed_psql($coord, sprintf(
	q{SELECT string_agg(node_name || ':' || success || ':' || jsonb_array_length(result), ' ' ORDER BY node_name)
	  FROM peerpool.parallel_query(%s, ARRAY['by_name', 'by_ip'])}, PeerpoolFleet::quote($big)));
is($got, 'by_ip:true:100000 by_name:true:100000', 'parallel_query: 100,000 rows from each TLS node');
note sprintf('parallel_query: 2 x 100,000 rows over TLS in %.2f s', $secs);

# ---------------------------------------------------------------------------------------
# Refused: sslmode=require to a server without TLS, verify-full with the wrong CA

ok( PeerpoolFleet::wait_for_health($coord,
		"count(*) FILTER (WHERE node_name IN ('no_tls_peer', 'wrong_ca') AND state = 'unhealthy' AND last_error IS NOT NULL) = 2",
		30),
	'sslmode=require to a peer without TLS, and verify-full with the wrong CA: unhealthy');
my %error = map { split /\|/, $_, 2 } split /\n/, $coord->safe_psql('postgres',
	q{SELECT node_name || '|' || last_error FROM peerpool.node_health WHERE node_name IN ('no_tls_peer', 'wrong_ca')});
note "no_tls_peer: $error{no_tls_peer}";
note "wrong_ca: $error{wrong_ca}";
like($error{no_tls_peer}, qr/server does not support SSL, but SSL was required/,
	'no_tls_peer: last_error says the server does not support SSL');
like($error{wrong_ca}, qr/certificate verify failed/, 'wrong_ca: last_error says certificate verify failed');
for my $n ('no_tls_peer', 'wrong_ca')
{
	my ($ret, $err) = PeerpoolFleet::psql_error($coord,
		"SELECT * FROM peerpool.pool_query('SELECT 1', '$n') AS t(a int)");
	isnt($ret, 0, "$n: pool_query fails");
	like($err, qr/08006/, "$n: with 08006");
	like($err, $n eq 'wrong_ca' ? qr/certificate verify failed/ : qr/SSL/, "$n: and says why");
}
is( $coord->safe_psql('postgres',
		q{SELECT string_agg(node_name || ':' || success, ' ' ORDER BY node_name) FROM peerpool.parallel_query('SELECT 1')}),
	'by_ip:true by_name:true no_tls_peer:false wrong_ca:false',
	'parallel_query: the refused nodes fail, the TLS nodes answer');
# Nothing of ours reached the plain peer.
is(PeerpoolFleet::remote_sessions($plain), '0', 'no session of ours on the peer without TLS');

PeerpoolFleet::check_logs($coord, $tls, $plain);
done_testing();
