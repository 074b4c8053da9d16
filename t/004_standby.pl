# Copyright (c) pg_peerpool contributors

# Role detection and replication lag (SPEC sections 3 and 4): a streaming standby
# registered with role auto is detected as a standby and reports its replay lag, turns
# degraded when replay falls behind by more than peerpool.degraded_lag and healthy again
# when it catches up, and a promotion is a role change: transitioning, then healthy as a
# primary.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use PeerpoolFleet;

my $degraded_lag_ms = 500;

my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<"EOC");
peerpool.health_check_interval = '200ms'
peerpool.health_check_timeout = '1s'
peerpool.degraded_lag = '${degraded_lag_ms}ms'
peerpool.unhealthy_lag = '60s'
peerpool.degraded_latency = '500ms'
EOC

# A primary that allows streaming and a standby streaming from it, both on 127.0.0.1 too.
my ($primary, $standby) = PeerpoolFleet::streaming_pair();

# A transaction replayed on the standby, so that pg_last_xact_replay_timestamp() is set.
$primary->safe_psql('postgres', 'CREATE TABLE t (i int); INSERT INTO t VALUES (1)');
$primary->wait_for_catchup($standby);

# One node's columns from node_health, joined with ','.
sub health
{
	my ($name, $cols) = @_;
	return $coord->safe_psql('postgres',
		"SELECT concat_ws(',', $cols) FROM peerpool.node_health WHERE node_name = '$name'");
}

# ---------------------------------------------------------------------------------------
# Role auto: the primary is detected as primary (no lag), the standby as standby (lag set).

my $t0 = time;
PeerpoolFleet::register($coord, $primary, $standby);
is($coord->safe_psql('postgres', 'SELECT string_agg(role, \',\' ORDER BY node_name) FROM peerpool.nodes'),
	'auto,auto', 'both nodes registered with role auto');
my $elapsed = PeerpoolFleet::wait_for_health(
	$coord,
	"count(*) FILTER (WHERE node_name = 'primary' AND state = 'healthy' AND role = 'primary') = 1"
	  . " AND count(*) FILTER (WHERE node_name = 'standby' AND state = 'healthy' AND role = 'standby'"
	  . " AND replication_lag_ms IS NOT NULL) = 1",
	15,
	start => $t0);
PeerpoolFleet::timed_ok($elapsed, 5, 'primary and standby healthy with their detected roles');
is(health('primary', 'role, replication_lag_ms IS NULL'), 'primary,t',
	'primary: role primary, replication_lag_ms NULL');
is( health('standby', 'role, replication_lag_ms >= 0, replication_lag_ms < ' . $degraded_lag_ms),
	'standby,t,t', 'standby: role standby, replication_lag_ms small');
note 'standby lag while streaming: ' . health('standby', 'replication_lag_ms') . ' ms';

# ---------------------------------------------------------------------------------------
# Replay paused on the standby while the primary writes: the lag grows past degraded_lag,
# the standby turns degraded, the primary stays healthy; resumed: healthy again.

$standby->safe_psql('postgres', 'SELECT pg_wal_replay_pause()');
my $t_write = time;
$primary->safe_psql('postgres', 'INSERT INTO t VALUES (2)');
ok( PeerpoolFleet::wait_until(
		$standby, "SELECT pg_get_wal_replay_pause_state() = 'paused'"
		  . ' AND pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()',
		timeout => 10),
	'standby received WAL it does not replay');
$elapsed = PeerpoolFleet::wait_for_health($coord,
	"count(*) FILTER (WHERE node_name = 'standby' AND state = 'degraded') = 1",
	15, start => $t_write);
ok(defined $elapsed, 'standby degraded while replay is paused');
note sprintf('standby degraded %.1f ms after the write on the primary (degraded_lag %d ms)',
	1000 * ($elapsed // 0), $degraded_lag_ms);
my $lag = health('standby', 'replication_lag_ms');
note "standby lag while paused: $lag ms";
cmp_ok($lag, '>', $degraded_lag_ms, 'standby replication_lag_ms above degraded_lag while degraded');
is(health('primary', 'state'), 'healthy', 'the primary stays healthy');
my @ev = grep { $_->{to} eq 'degraded' } PeerpoolFleet::events($coord, 'standby', since => $t_write);
is(join(',', map { "$_->{from}->$_->{to}" } @ev), 'healthy->degraded', 'event healthy -> degraded');
note 'degraded reason: ' . ($ev[0]{reason} // '(none)');

my $t_resume = time;
$standby->safe_psql('postgres', 'SELECT pg_wal_replay_resume()');
$elapsed = PeerpoolFleet::wait_for_health($coord,
	"count(*) FILTER (WHERE node_name = 'standby' AND state = 'healthy' AND replication_lag_ms < $degraded_lag_ms) = 1",
	15, start => $t_resume);
PeerpoolFleet::timed_ok($elapsed, 3, 'standby healthy again after replay resumed');
@ev = PeerpoolFleet::events($coord, 'standby', since => $t_resume);
is($ev[-1]{from} . '->' . $ev[-1]{to}, 'degraded->healthy', 'event degraded -> healthy')
  if @ev;
ok(scalar @ev, 'an event after the resume');

# ---------------------------------------------------------------------------------------
# Promotion: a role change makes the node transitioning; the next check confirms it as
# a healthy primary.

my $t_promote = time;
is($standby->safe_psql('postgres', 'SELECT pg_promote()'), 't', 'standby promoted');
my $promoted = time;
note sprintf('pg_promote() took %.1f ms', 1000 * ($promoted - $t_promote));
$elapsed = PeerpoolFleet::wait_for_health($coord,
	"count(*) FILTER (WHERE node_name = 'standby' AND state = 'healthy' AND role = 'primary') = 1",
	15, start => $promoted);
PeerpoolFleet::timed_ok($elapsed, 3, 'promoted node healthy with role primary');
is(health('standby', 'role, replication_lag_ms IS NULL'), 'primary,t',
	'promoted node: role primary, replication_lag_ms NULL');

@ev = PeerpoolFleet::events($coord, 'standby', since => $t_promote);
note "events after pg_promote():\n" . join("\n", map { "  $_->{from}->$_->{to}: $_->{reason}" } @ev);
my ($i) = grep { $ev[$_]{to} eq 'transitioning' } 0 .. $#ev;
ok(defined $i, 'a transition to transitioning after the promotion');
if (defined $i)
{
	is($ev[$i]{from}, 'healthy', 'transitioning came from healthy');
	like($ev[$i]{reason}, qr/primary/, 'the reason names the new role');
	like($ev[$i]{reason}, qr/role|promot|standby/i, 'the reason says it is a role change');
	my $next = $ev[ $i + 1 ];
	is(defined $next ? "$next->{from}->$next->{to}" : '(none)',
		'transitioning->healthy', 'the next event confirms: transitioning -> healthy');
}
is(scalar(grep { $_->{to} =~ /^(unhealthy|reconnecting)$/ } @ev), 0,
	'the promotion did not make the node unhealthy');
is(health('primary', 'state, role'), 'healthy,primary', 'the old primary is still a healthy primary');

# ---------------------------------------------------------------------------------------

PeerpoolFleet::check_logs($coord, $primary, $standby);
$_->stop for ($coord, $standby, $primary);

done_testing();
