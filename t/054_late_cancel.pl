# Copyright (c) pg_peerpool contributors
#
# A cancel that does not reach the node in time (SPEC section 5: a timed-out call's remote
# query must not outlive it, and must never hit the next caller's query). Cancels are protocol
# CancelRequests sent by PQcancel on a new connection; here the node sits behind a proxy that
# accepts new connections at once but connects them upstream only after 6 s, so the cancel is
# stuck while the pooled session keeps running the caller's pg_sleep(30). After
# connect_timeout + health_check_timeout (2 s) the pool manager gives up: it logs that it could
# not cancel, and closes the session instead (the peer then ends the query), so a late cancel
# can only hit a session that no longer exists; the node then serves the next call.
use strict;
use warnings FATAL => 'all';

use lib 't';
use FaultProxy;
use PeerpoolFleet;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $user  = getpwuid($<) // $ENV{USER};
my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.connect_timeout = '1s'
peerpool.health_check_timeout = '1s'
peerpool.health_check_interval = '60s'
EOC
# The peer notices a closed client connection while it sleeps.
my ($peer) = PeerpoolFleet::peers(1, conf => "client_connection_check_interval = '100ms'");
my $proxy = FaultProxy->new(upstream_port => $peer->port, name => 'px');
END { $proxy->stop if $proxy; }

$proxy->register($coord, $user, 1);
ok(defined PeerpoolFleet::wait_for_health($coord, "bool_and(state = 'healthy')"), 'px healthy');
my $sleeping = q{SELECT count(*) FROM pg_stat_activity
                  WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()};

$proxy->connect_delay(6000);    # the cancel's own connection reaches the peer only after 6 s
my $log_offset = -s $coord->logfile;
my $t0         = time;
my ($rc, $out, $err) = $coord->psql('postgres',
	q{SELECT x FROM peerpool.pool_query('SELECT pg_sleep(30)::text', 'px', timeout_ms => 300) AS t(x text)});
isnt($rc, 0, 'the call fails at its timeout');
like($err, qr/timeout|cancel/i, 'with a timeout error') or diag $err;
is($peer->safe_psql('postgres', $sleeping), '1',
	'the remote query still runs while its cancel is held');

ok($coord->wait_for_log(qr/node "px": could not cancel the query of remote backend \d+: no answer within/,
		$log_offset),
	'the pool manager gives up on the cancel and says so');
my $gave_up = time - $t0;
note sprintf('gave up on the cancel %.2f s after the call started', $gave_up);
cmp_ok($gave_up, '>=', 1.9, 'not before connect_timeout + health_check_timeout');
ok(defined PeerpoolFleet::wait_until($peer, "SELECT ($sleeping) = 0", timeout => 10),
	'the remote query ends: the pool manager closed its session');

# Meanwhile the pool's replacement connection (min_connections 1) was also accepted and held
# by the proxy, past connect_timeout: the node goes unhealthy for that, rightly, since it cannot
# be reached. Once the proxy lets new connections through, it recovers and serves the next call.
$proxy->pass;
ok( defined PeerpoolFleet::wait_until($coord,
		q{SELECT count(*) > 0 FROM peerpool.events
		   WHERE node_name = 'px' AND reason LIKE 'could not connect: timeout expired%'}, timeout => 20),
	'the held replacement connection timed out');
ok( defined PeerpoolFleet::wait_until($coord,
		q{SELECT count(*) > 0 FROM peerpool.events
		   WHERE node_name = 'px' AND reason LIKE 'recovered after%'}, timeout => 20),
	'px recovers once new connections go through');
ok(defined PeerpoolFleet::wait_for_health($coord, "bool_and(state = 'healthy')", 20),
	'px healthy again');
is($coord->safe_psql('postgres',
		q{SELECT x FROM peerpool.pool_query('SELECT 42::text', 'px') AS t(x text)}),
	'42', 'the next call is served');

$proxy->stop;
undef $proxy;
PeerpoolFleet::check_logs($coord, $peer);
$coord->stop;
$peer->stop;
done_testing();
