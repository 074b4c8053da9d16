# Copyright (c) pg_peerpool contributors

# What LISTEN exposes (issue 8, finding 3): any role that can connect may LISTEN
# peerpool_events, and reasons carry host names and libpq errors. peerpool.notify_reason = off
# (superuser, reload) leaves the "reason" key out of the payload; peerpool.events keeps it.

use strict;
use warnings FATAL => 'all';

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use PeerpoolFleet;

my $coord = PeerpoolFleet::coordinator('coord', conf => <<'EOC');
peerpool.health_check_interval = '200ms'
EOC
$coord->safe_psql('postgres', 'CREATE ROLE nobody LOGIN');

# An unprivileged listener: no grant at all.
my $listener = $coord->background_psql('postgres', extra_params => [ '-U', 'nobody' ]);
$listener->query_safe('LISTEN peerpool_events');

# Notifications about $node until one has to_state $to (or the deadline): the decoded payloads.
sub collect_until
{
	my ($node, $to, $timeout) = @_;
	my @seen;
	my $deadline = time + $timeout;
	while (time < $deadline)
	{
		my $out = $listener->query('SELECT 1');
		for my $line (split /\n/, $out)
		{
			next unless $line =~ /^Asynchronous notification "peerpool_events" with payload "(.*)" received/;
			my $json = eval { JSON::PP->new->decode($1) } or next;
			push @seen, $json if $json->{node_name} eq $node;
		}
		return @seen if grep { $_->{to} eq $to } @seen;
		usleep(50_000);
	}
	return @seen;
}

my $closed = PostgreSQL::Test::Cluster::get_free_port();
my $add = sub {
	my ($name) = @_;
	$coord->safe_psql('postgres',
		"SELECT peerpool.pool_add_node('$name', 'host=127.0.0.1 port=$closed dbname=postgres')");
};

# Default (on): the reason, with the host and libpq's error, reaches the unprivileged listener.
$add->('down_on');
my @on = collect_until('down_on', 'unhealthy', 30);
my ($unhealthy_on) = grep { $_->{to} eq 'unhealthy' } @on;
ok($unhealthy_on, 'notify_reason = on: the unprivileged listener got the transition');
like($unhealthy_on->{reason} // '', qr/127\.0\.0\.1/, 'notify_reason = on: the reason names the host');

# Off: no reason key in any payload; the events view keeps it.
PeerpoolFleet::set_gucs($coord, 'peerpool.notify_reason' => 'off');
PeerpoolFleet::wait_until($coord, "SELECT current_setting('peerpool.notify_reason') = 'off'", timeout => 30);
# The reload reaches the pool manager in the same signal round; give it a transition to show.
$add->('down_off');
my @off = collect_until('down_off', 'unhealthy', 30);
ok((grep { $_->{to} eq 'unhealthy' } @off), 'notify_reason = off: the transition is still notified');
is(scalar(grep { exists $_->{reason} } @off), 0, 'notify_reason = off: no payload has a reason');
is(join(',', sort keys %{ $off[0] // {} }), 'at,from,node_name,to', 'the payload keys without the reason');
like($coord->safe_psql('postgres',
		"SELECT reason FROM peerpool.events WHERE node_name = 'down_off' AND to_state = 'unhealthy' LIMIT 1"),
	qr/127\.0\.0\.1/, 'peerpool.events keeps the full reason');

my ($ret, $err) = PeerpoolFleet::psql_error($coord, 'SET peerpool.notify_reason = on');
like($err, qr/cannot be changed now/, 'a session cannot change it');

$listener->quit;
PeerpoolFleet::check_logs($coord);
$coord->stop;
done_testing();
