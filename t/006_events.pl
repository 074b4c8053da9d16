# Copyright (c) pg_peerpool contributors

# Every state change is an event (SPEC section 3): a row in peerpool.events (most recent
# first), a LOG line 'pg_peerpool: node "NAME": FROM -> TO: REASON', and NOTIFY
# peerpool_events with a JSON payload {node_name, from, to, reason, at} sent by the pool
# manager. All three tell the same story.

use strict;
use warnings FATAL => 'all';

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $coord = PeerpoolFleet::coordinator(
	'coord', conf => <<"EOC");
peerpool.health_check_interval = '300ms'
peerpool.health_check_timeout = '1s'
peerpool.reconnect_backoff_initial = '200ms'
peerpool.reconnect_backoff_max = '400ms'
peerpool.degraded_latency = '500ms'
EOC
my ($peer) = PeerpoolFleet::peers(1);
my $name = $peer->name;

# A session listening on peerpool_events. psql prints notifications after each command it
# runs, so collecting them means running trivial queries until they show.
my $listener = $coord->background_psql('postgres');
$listener->query_safe('LISTEN peerpool_events');
my @notes;    # every notification received, in order: { payload, pid, json }

# Run trivial queries until $done->() is true or $timeout seconds pass; returns the elapsed
# seconds or undef.
sub collect
{
	my ($done, $timeout) = @_;
	my $start = time;
	while (1)
	{
		my $out = $listener->query('SELECT 1');
		for my $line (split /\n/, $out)
		{
			next
			  unless $line =~
			  /^Asynchronous notification "peerpool_events" with payload "(.*)" received from server process with PID (\d+)\.$/;
			my ($payload, $pid) = ($1, $2);
			my $json = eval { JSON::PP->new->decode($payload) };
			push @notes, { payload => $payload, pid => $pid, json => $json };
		}
		return time - $start if $done->();
		return undef if time - $start > $timeout;
		usleep(50_000);
	}
}

# The notifications for our node, as decoded JSON (undecodable ones skipped: checked apart).
sub node_notes
{
	return map { $_->{json} } grep { ref $_->{json} eq 'HASH' && ($_->{json}{node_name} // '') eq $name } @notes;
}

sub seen_to
{
	my ($to, $after) = @_;
	my @n = node_notes();
	return scalar grep { ($_->{to} // '') eq $to } @n[ ($after // 0) .. $#n ];
}

# ---------------------------------------------------------------------------------------
# Registration: disconnected -> connecting -> healthy arrive as notifications.

my $t0 = time;
PeerpoolFleet::register($coord, $peer);
my $elapsed = collect(sub { seen_to('healthy') }, 15);
ok(defined $elapsed, "notification: $name became healthy");
note sprintf('healthy notification received %.1f ms after registration', 1000 * (time - $t0));
is_deeply([ map { "$_->{from}->$_->{to}" } node_notes() ],
	[ 'disconnected->connecting', 'connecting->healthy' ],
	'notifications for the registration: disconnected -> connecting -> healthy');

# ---------------------------------------------------------------------------------------
# A peer stopped: healthy -> unhealthy, then reconnecting -> unhealthy per failed retry; started again:
# healthy; removed: draining.

my $n_before = scalar node_notes();
$peer->stop('immediate');
my $t_stop = time;
$elapsed = collect(sub { seen_to('reconnecting', $n_before) }, 15);
ok(defined $elapsed, "notification: $name reconnecting after the stop");
note sprintf('reconnecting notification received %.1f ms after the stop', 1000 * ($elapsed // 0));

# Let at least one retry fail, so that reconnecting -> unhealthy is covered too.
collect(sub { grep { $_->{from} eq 'reconnecting' && $_->{to} eq 'unhealthy' } node_notes() }, 10);
$peer->start;
my $n_mid = scalar node_notes();
$elapsed = collect(sub { seen_to('healthy', $n_mid) }, 15);
ok(defined $elapsed, "notification: $name healthy again after restart");

$n_mid = scalar node_notes();
$coord->safe_psql('postgres', "SELECT peerpool.pool_remove_node('$name')");
$elapsed = collect(sub { seen_to('draining', $n_mid) }, 10);
ok(defined $elapsed, "notification: $name draining after pool_remove_node");
note sprintf('draining notification received %.1f ms after pool_remove_node', 1000 * ($elapsed // 0));
ok(PeerpoolFleet::wait_for_health($coord, "count(*) FILTER (WHERE node_name = '$name') = 0"),
	'the removed node leaves node_health');
# Anything still on its way.
collect(sub { 0 }, 0.5);
$listener->quit;

# ---------------------------------------------------------------------------------------
# Every payload is a JSON object with exactly the contract keys, sent by the pool manager.

my ($worker) = PeerpoolFleet::worker_pids($coord);
my @bad_json = grep { ref $_->{json} ne 'HASH' } @notes;
is(scalar @bad_json, 0, 'every payload is a JSON object')
  or diag join("\n", map { $_->{payload} } @bad_json);
my @bad_keys =
  grep { join(',', sort keys %{ $_->{json} }) ne 'at,from,node_name,reason,to' }
  grep { ref $_->{json} eq 'HASH' } @notes;
is(scalar @bad_keys, 0, 'every payload has exactly the keys node_name, from, to, reason, at')
  or diag join("\n", map { $_->{payload} } @bad_keys);
is(join(',', sort { $a <=> $b } keys %{ { map { $_->{pid} => 1 } @notes } }),
	$worker, 'every notification comes from the pool manager');
note 'a payload: ' . $notes[-1]{payload} if @notes;

my @n = node_notes();
my @trans = map { "$_->{from}->$_->{to}" } @n;
note "notified transitions: @trans";
ok((grep { $_ eq 'healthy->unhealthy' } @trans), 'notified healthy -> unhealthy');
ok((grep { $_ eq 'unhealthy->reconnecting' } @trans), 'notified unhealthy -> reconnecting');
ok((grep { $_ eq 'reconnecting->unhealthy' } @trans), 'notified reconnecting -> unhealthy (a failed retry)');
is($trans[-1], 'healthy->draining', 'the last notification is healthy -> draining');

# The story is consistent: each transition starts where the previous one ended, time moves
# forward, reasons are given.
my @problems;
for my $i (0 .. $#n)
{
	push @problems, "notification $i has an empty reason" if ($n[$i]{reason} // '') eq '';
	push @problems, "notification $i: 'at' is not an ISO 8601 timestamp: $n[$i]{at}"
	  unless ($n[$i]{at} // '') =~ /^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d/;
	next if $i == 0;
	push @problems, "notification $i starts at $n[$i]{from}, the previous ended at $n[$i-1]{to}"
	  if $n[$i]{from} ne $n[ $i - 1 ]{to};
}
is(join("\n", @problems), '', 'notifications chain from state to state, with reasons and timestamps');
my $ats = join(',', map { PeerpoolFleet::quote($_->{at}) . '::timestamptz' } @n);
is( $coord->safe_psql('postgres',
		"SELECT bool_and(a >= lag_a OR lag_a IS NULL) AND bool_and(a BETWEEN now() - interval '5 minutes' AND now())"
		  . " FROM (SELECT a, lag(a) OVER (ORDER BY o) AS lag_a FROM unnest(ARRAY[$ats]) WITH ORDINALITY AS u(a, o)) s"),
	't', "'at' values are timestamptz literals, recent and non-decreasing");

# ---------------------------------------------------------------------------------------
# peerpool.events: most recent first, at most 1024 rows, and the same transitions as the
# notifications (same order, reasons and times).

is( $coord->safe_psql('postgres',
		'SELECT count(*) <= 1024 AND bool_and(at <= lag_at OR lag_at IS NULL) FROM'
		  . ' (SELECT at, lag(at) OVER (ORDER BY n) AS lag_at FROM'
		  . ' (SELECT row_number() OVER () AS n, at FROM peerpool.events) e) s'),
	't', 'peerpool.events lists at most 1024 events, most recent first');
my @ev = PeerpoolFleet::events($coord, $name);
is_deeply(
	[ map { "$_->{from}->$_->{to}: $_->{reason}" } @ev ],
	[ map { "$_->{from}->$_->{to}: $_->{reason}" } @n ],
	'peerpool.events holds the notified transitions, in order, with the same reasons');
my $ev_ats = join(',', map { PeerpoolFleet::quote($_->{at}) . '::timestamptz' } @ev);
is( $coord->safe_psql('postgres',
		"SELECT count(*) FROM unnest(ARRAY[$ats], ARRAY[$ev_ats]) AS u(n, e) WHERE n = e"),
	scalar(@n), "each notification's 'at' is the time of its event row");

# ---------------------------------------------------------------------------------------
# The server log has one LOG line per transition, in the contract format.

my $log = slurp_file($coord->logfile);
my @missing;
for my $e (@ev)
{
	my $line = sprintf('pg_peerpool: node "%s": %s -> %s: %s', $name, $e->{from}, $e->{to}, $e->{reason});
	push @missing, $line unless $log =~ /LOG:\s+\Q$line\E$/m;
}
is(join("\n", @missing), '', 'a LOG line "pg_peerpool: node \"NAME\": FROM -> TO: REASON" for every event');
my @lines = grep { /pg_peerpool: node "\Q$name\E": \w+ -> \w+: / } split /\n/, $log;
is(scalar @lines, scalar @ev, 'no other transition LOG lines for the node');
note "log lines:\n" . join("\n", @lines);

# ---------------------------------------------------------------------------------------

PeerpoolFleet::check_logs($coord, $peer);
$_->stop for ($coord, $peer);

done_testing();
