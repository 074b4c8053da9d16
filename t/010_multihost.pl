# Copyright (c) pg_peerpool contributors

# A conninfo with several hosts: libpq moves to the next address by closing the socket and
# opening another, which usually gets the same file descriptor number. The pool manager must
# notice (its wait set is rebuilt), or the attempt stalls until connect_timeout and the node
# is never reached. The first address here refuses TCP connections; the second is a peer.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

# connect_timeout far above what the test allows: a stalled attempt cannot pass by luck.
my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<"EOC");
peerpool.connect_timeout = '20s'
peerpool.health_check_interval = '500ms'
EOC
my ($peer) = PeerpoolFleet::peers(1);

# A port nobody listens on (free now, and the test starts nothing on it).
my $closed = PostgreSQL::Test::Cluster::get_free_port();
my $conninfo = sprintf('host=127.0.0.1,127.0.0.1 port=%d,%d dbname=postgres', $closed, $peer->port);

my $t0 = time;
$coord->safe_psql('postgres',
	"SELECT peerpool.pool_add_node('multi', " . PeerpoolFleet::quote($conninfo) . ")");
my $elapsed = PeerpoolFleet::wait_for_health($coord,
	"bool_and(state = 'healthy') FILTER (WHERE node_name = 'multi')", 10, start => $t0);
ok(defined $elapsed && $elapsed < 5, 'a node whose first address refuses is reached through the second');
note sprintf('multi-host node healthy %.1f ms after registration', 1000 * ($elapsed // 99));

is($coord->safe_psql('postgres',
		"SELECT result FROM peerpool.parallel_query('SELECT current_setting(''port'')::int AS port', ARRAY['multi'])"),
	sprintf('[{"port": %d}]', $peer->port), 'queries run on the second address');

PeerpoolFleet::check_logs($coord, $peer);
$coord->stop;
$peer->stop;
done_testing();
