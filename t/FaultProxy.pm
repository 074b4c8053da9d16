# Copyright (c) pg_peerpool contributors

=pod

=head1 NAME

FaultProxy - a PostgreSQL wire-protocol proxy that injects network faults, for TAP tests

=head1 SYNOPSIS

  use lib 't';
  use FaultProxy;

  my $proxy = FaultProxy->new(upstream_port => $peer->port, name => 'p1');
  my $conninfo = sprintf('host=127.0.0.1 port=%d dbname=postgres', $proxy->port);

  $proxy->kill_at(dir => 'bf', type => 'D', n => 100, how => 'rst',
      match => qr/generate_series/);       # RST at the 100th DataRow of that query
  ... run the query through the proxy ...
  my $s = $proxy->stats;                   # { accepted => .., open => .., actions => .. }
  $proxy->pass;                            # back to plain forwarding, rules cleared
  $proxy->stop;

=head1 DESCRIPTION

C<new> opens a listening socket on 127.0.0.1 (a port chosen by the OS, see C<port>),
then forks a child that accepts connections there and forwards each to the upstream
server (127.0.0.1:C<upstream_port>), parsing the PostgreSQL protocol in both
directions: the startup phase (StartupMessage, SSLRequest, GSSENCRequest,
CancelRequest: no type byte; the single-byte answer to SSLRequest/GSSENCRequest),
then messages of one type byte and an int32 length. Only whole messages are
forwarded, so every rule acts on a message boundary. If TLS or GSS encryption is
accepted, or a length is impossible, that connection is forwarded as raw bytes from
then on (delay and freeze still apply, message rules no longer do).

The test controls the child through a Unix socket pair: each method sends one line
and waits for the one-line answer, so a command is in effect when the method
returns (a message already written to a socket is not called back, of course).

Directions: C<fb> is frontend to backend (client to peer), C<bf> backend to
frontend. A message type is its type byte (C<Q>, C<P>, C<X>; C<R>, C<T>, C<D>,
C<C>, C<Z>, C<E>, ...), or for the untyped startup phase one of C<startup>,
C<ssl>, C<gss>, C<cancel> (fb) and C<sslanswer> (bf). Under C<trust> or any other
authentication the last C<R> message of a connection is AuthenticationOk; with
C<trust> it is the only one.

The I<current query> of a connection is the text of the last C<Q> (or C<P>, its
query string) message the client sent on it. A rule with C<match> counts only
messages seen while the current query matches that regex (for an fb C<Q>, the
query it carries), so health checks and reset queries of the pool are not hit by
accident.

Every action (accepts, upstream connects, closes, commands, rules firing) is
logged with a timestamp to C<log_path>; C<stop> prints the path and the end of the
log with C<diag> when the test is failing.

=head1 METHODS

All methods except C<new>, C<port>, C<log_path> and C<stop> are commands to the
child; they die if the child does not answer within 10 s or refuses the command.

=over

=item FaultProxy->new(upstream_port => $port, %opts)

Options: C<upstream_host> (default 127.0.0.1), C<port> (the port to listen on;
default 0, one the OS chooses), C<name> (for the log file name and
the log lines, default C<proxy>), C<log> (the log file; default
F<< $PostgreSQL::Test::Utils::log_path/fault_proxy_<name>.log >>, or a file in
/tmp without a test framework).

=item port / log_path / pid

The listening port; the log file; the child's pid.

=item pass

Back to plain forwarding: no delay, no connect delay, not frozen, not refusing,
every rule removed. Connections stay open.

=item delay($ms)

Hold every message (both directions, all connections, and their EOFs) for C<$ms>
ms before forwarding it. Order is kept. 0 turns it off.

=item connect_delay($ms)

Accept new connections at once but connect them upstream only after C<$ms> ms
(what the client sends meanwhile is held). 0 turns it off.

=item freeze / thaw

C<freeze> stops all forwarding both ways and all upstream connects (new
connections are accepted and held): a peer that answers nothing with its
sockets open. C<thaw> resumes (C<pass> does too).

=item close_all / reset_all

Close every current connection, both sides, at once: with FIN, or with RST
(SO_LINGER 0, then close). New connections are served as before.

=item refuse

C<reset_all>, and from now on accept every new connection only to reset it
(RST) at once, until C<pass>.

=item kill_at(dir => 'fb'|'bf', type => $t, n => $n, how => 'fin'|'rst', match => qr/.../, times => $k)

At the C<$n>-th message of type C<$t> in direction C<dir> (counted over all
connections from now on, and only while the current query matches C<match>, if
given), drop that message and close its connection, both sides, with C<how>
(default C<rst>). With C<how =E<gt> 'fin'>, what was forwarded before is still
delivered first. C<times> (default 1): how many times the rule fires (the count
starts again after each); 0 = every C<$n>-th message, until C<pass> or
C<clear_rules>. Returns the rule's id.

=item garble_at(dir => ..., type => ..., n => ..., byte => '!', match => ..., times => ...)

Like C<kill_at>, but forward the message with its type byte replaced by C<byte>
(one character, default C<!>), and keep the connection open.

=item clear_rules

Remove every C<kill_at>/C<garble_at> rule.

=item stats

A hashref of counters: C<accepted>, C<open> (client connections open now),
C<closed>, C<refused> (connections reset by C<refuse>), C<upstream_failed>,
C<actions> (rules fired + connections closed by C<close_all>/C<reset_all>/
C<refuse>), C<fired> (rules fired), C<rules> (armed rules), C<mode>
(C<pass>, or a comma list of C<delay>, C<connect_delay>, C<freeze>, C<refuse>),
and C<msgs_fb_X> / C<msgs_bf_X> (messages of type X forwarded so far).

=item wait_for($code, $timeout_s)

Poll C<stats> every 10 ms until C<< $code->($stats) >> is true. Returns the
elapsed seconds, or undef after C<$timeout_s> (default 30).

=item stop

Stop the child (SIGTERM, then SIGKILL after 5 s) and reap it. Called from
DESTROY too.

=back

=cut

package FaultProxy;

use strict;
# Not FATAL: a stray warning in the child must not kill the proxy (warnings go to its log).
use warnings;

use Carp;
use IO::Select;
use IO::Socket::INET;
use POSIX qw(:sys_wait_h EAGAIN EWOULDBLOCK EINTR EINPROGRESS);
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC SOL_SOCKET SO_LINGER SHUT_WR);
use Time::HiRes qw(time usleep);

my $SSL_REQUEST    = 80877103;
my $GSSENC_REQUEST = 80877104;
my $CANCEL_REQUEST = 80877102;

# ---------------------------------------------------------------------------------------
# Parent side

sub new
{
	my ($class, %opts) = @_;
	croak 'upstream_port is required' unless $opts{upstream_port};
	my $name = $opts{name} // 'proxy';
	my $log  = $opts{log};
	if (!defined $log)
	{
		no warnings 'once';
		my $dir = $PostgreSQL::Test::Utils::log_path // '/tmp';
		$log = "$dir/fault_proxy_$name.log";
		$log = "/tmp/fault_proxy_${name}_$$.log" unless -d $dir && -w $dir;
	}
	my $listener = IO::Socket::INET->new(
		LocalAddr => '127.0.0.1',
		LocalPort => $opts{port} // 0,
		Listen    => 128,
		ReuseAddr => 1,
		Proto     => 'tcp') or croak "FaultProxy: cannot listen on 127.0.0.1: $!";
	socketpair(my $parent_end, my $child_end, AF_UNIX, SOCK_STREAM, PF_UNSPEC)
	  or croak "FaultProxy: socketpair: $!";
	my $self = bless {
		name          => $name,
		log           => $log,
		port          => $listener->sockport,
		upstream_host => $opts{upstream_host} // '127.0.0.1',
		upstream_port => $opts{upstream_port},
	}, $class;

	my $pid = fork;
	croak "FaultProxy: fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		close $parent_end;
		my $rc = 0;
		eval { $self->_child_main($listener, $child_end); 1 } or do
		{
			my $err = $@;
			eval { $self->_log("child died: $err") };
			$rc = 1;
		};
		# Never run the test's END blocks (they would stop the test's servers).
		POSIX::_exit($rc);
	}
	close $child_end;
	close $listener;
	$self->{pid}  = $pid;
	$self->{ctl}  = $parent_end;
	$self->{ppid} = $$;
	$parent_end->autoflush(1);
	$self->_command('ping');
	return $self;
}

sub port     { return $_[0]{port}; }
sub log_path { return $_[0]{log}; }

# The conninfo of database postgres as `user`, reached through this proxy.
sub conninfo
{
	my ($self, $user) = @_;
	return sprintf('host=127.0.0.1 port=%d dbname=postgres user=%s', $self->port, $user);
}

# Registers on `coord` the node px, reached through this proxy as `user`, with
# min_connections 1 and max_connections `max_conn`.
sub register
{
	my ($self, $coord, $user, $max_conn) = @_;
	_add_node($coord, 'px', $self->conninfo($user), $max_conn);
	return;
}

# register, plus the node direct (the peer `direct` without a proxy) with the same bounds: the
# pair the fault tests compare.
sub register_pair
{
	my ($self, $coord, $user, $direct, $max_conn) = @_;
	$self->register($coord, $user, $max_conn);
	_add_node($coord, 'direct', PeerpoolFleet::peer_conninfo($direct), $max_conn);
	return;
}

sub _add_node
{
	my ($coord, $name, $conninfo, $max_conn) = @_;
	$coord->safe_psql('postgres', sprintf(
		q{SELECT peerpool.pool_add_node('%s', %s, min_connections => 1, max_connections => %d)},
		$name, PeerpoolFleet::quote($conninfo), $max_conn));
	return;
}
sub pid      { return $_[0]{pid}; }

sub _command
{
	my ($self, $line) = @_;
	croak "FaultProxy $self->{name}: stopped" unless $self->{ctl};
	my $ctl = $self->{ctl};
	my $w = syswrite($ctl, "$line\n");
	croak "FaultProxy $self->{name}: control write failed: $!" unless defined $w;
	my $reply = '';
	my $deadline = time + 10;
	my $sel = IO::Select->new($ctl);
	while ($reply !~ /\n/)
	{
		my $left = $deadline - time;
		croak "FaultProxy $self->{name}: no answer to '$line' (log: $self->{log})"
		  if $left <= 0;
		next unless $sel->can_read($left);
		my $n = sysread($ctl, my $buf, 4096);
		croak "FaultProxy $self->{name}: child gone during '$line' (log: $self->{log})"
		  unless $n;
		$reply .= $buf;
	}
	chomp $reply;
	croak "FaultProxy $self->{name}: '$line' refused: $reply" unless $reply =~ s/^ok ?//;
	return $reply;
}

sub pass          { return $_[0]->_command('pass'); }
sub freeze        { return $_[0]->_command('freeze'); }
sub thaw          { return $_[0]->_command('thaw'); }
sub close_all     { return $_[0]->_command('close_all'); }
sub reset_all     { return $_[0]->_command('reset_all'); }
sub refuse        { return $_[0]->_command('refuse'); }
sub clear_rules   { return $_[0]->_command('clear_rules'); }
sub delay         { return $_[0]->_command('delay ' . int($_[1])); }
sub connect_delay { return $_[0]->_command('connect_delay ' . int($_[1])); }

sub _rule
{
	my ($self, $verb, %r) = @_;
	croak "dir must be fb or bf" unless ($r{dir} // '') =~ /^(fb|bf)$/;
	croak "type is required" unless defined $r{type} && length $r{type};
	my $line = sprintf('%s dir=%s type=%s n=%d times=%d', $verb, $r{dir},
		unpack('H*', $r{type}), $r{n} // 1, $r{times} // 1);
	$line .= ' how=' . $r{how} if defined $r{how};
	$line .= ' byte=' . unpack('H*', $r{byte}) if defined $r{byte};
	$line .= ' match=' . unpack('H*', "$r{match}") if defined $r{match};
	return $self->_command($line);
}

sub kill_at   { my ($self, %r) = @_; return $self->_rule('kill', %r); }
sub garble_at { my ($self, %r) = @_; return $self->_rule('garble', %r); }

sub stats
{
	my ($self) = @_;
	my %s = map { split /=/, $_, 2 } split ' ', $self->_command('stats');
	return \%s;
}

sub wait_for
{
	my ($self, $code, $timeout) = @_;
	my $start = time;
	my $deadline = $start + ($timeout // 30);
	while (time < $deadline)
	{
		return time - $start if $code->($self->stats);
		usleep(10_000);
	}
	return undef;
}

sub stop
{
	my ($self) = @_;
	return unless $self->{pid} && $self->{ppid} == $$;
	my $pid = delete $self->{pid};
	if ($self->{ctl})
	{
		eval { $self->_command('quit') };
		close $self->{ctl};
		delete $self->{ctl};
	}
	my $deadline = time + 5;
	while (waitpid($pid, WNOHANG) == 0)
	{
		if (time > $deadline)
		{
			kill 'KILL', $pid;
			waitpid($pid, 0);
			last;
		}
		usleep(10_000);
	}
	if (defined $INC{'Test/More.pm'} && !Test::More->builder->is_passing)
	{
		my $tail = '';
		if (open my $fh, '<', $self->{log})
		{
			my @lines = <$fh>;
			close $fh;
			splice @lines, 0, @lines - 40 if @lines > 40;
			$tail = join '', @lines;
		}
		Test::More::diag("FaultProxy $self->{name} log: $self->{log}; last lines:\n$tail");
	}
	return;
}

sub DESTROY
{
	my ($self) = @_;
	local ($@, $!, $?);
	eval { $self->stop; 1 };
	return;
}

# ---------------------------------------------------------------------------------------
# Child side: one event loop over the listener, the control socket and every connection.
#
# A connection is a hash: id, c (client socket), u (upstream socket or undef), state
# (connecting_wait | open | closing), query (current query text), raw (no more
# parsing), for each direction d in (fb, bf): in_<d> (bytes read, not yet a whole
# message), out_<d> (array of [due_time, bytes-or-undef-for-EOF] to write to the
# receiving side), wbuf_<d> (bytes due and being written), eof_<d> (the sender
# closed), startup (fb still in the untyped phase), answer_pending (bf owes a
# one-byte answer to SSLRequest/GSSENCRequest).

sub _log
{
	my ($self, $msg) = @_;
	my $t = time;
	my @lt = localtime $t;
	my $fh = $self->{logfh};
	return unless $fh;
	printf $fh "%04d-%02d-%02d %02d:%02d:%02d.%03d [%s] %s\n", $lt[5] + 1900, $lt[4] + 1,
	  $lt[3], $lt[2], $lt[1], $lt[0], ($t - int $t) * 1000, $self->{name}, $msg;
	return;
}

sub _child_main
{
	my ($self, $listener, $ctl) = @_;
	open(my $logfh, '>>', $self->{log}) or die "cannot open $self->{log}: $!";
	$logfh->autoflush(1);
	$self->{logfh} = $logfh;
	# Hold none of the test's descriptors (psql pipes, the TAP stream).
	my %keep = map { $_ => 1 } (fileno($listener), fileno($ctl), fileno($logfh));
	open(STDIN,  '<',  '/dev/null');
	open(STDOUT, '>&', $logfh);
	open(STDERR, '>&', $logfh);
	$keep{$_} = 1 for (0, 1, 2);
	# Not closed but pointed at /dev/null: Perl handles inherited from the test still name
	# these numbers, and PerlIO counts references per number; a new socket reusing one
	# would then never really be closed (close() only drops PerlIO's count).
	open(my $null, '<', '/dev/null') or die "/dev/null: $!";
	$keep{ fileno $null } = 1;
	if (opendir my $dh, '/proc/self/fd')
	{
		my @fds = grep { /^\d+$/ && !$keep{$_} } readdir $dh;
		closedir $dh;
		POSIX::dup2(fileno $null, $_) for @fds;
	}
	$SIG{PIPE} = 'IGNORE';
	my $stop = 0;
	$SIG{TERM} = sub { $stop = 1 };
	$listener->blocking(0);

	$self->{conns}   = {};
	$self->{next_id} = 1;
	$self->{rules}   = [];
	$self->{next_rule} = 1;
	$self->{stat} = { map { $_ => 0 }
		  qw(accepted closed refused upstream_failed actions fired) };
	$self->{msgs} = {};
	$self->_reset_mode;
	$self->_log(sprintf('listening on 127.0.0.1:%d, upstream %s:%d, pid %d',
			$self->{port}, $self->{upstream_host}, $self->{upstream_port}, $$));
	my $ppid = getppid;
	my $ctl_in = '';

	while (!$stop)
	{
		last if getppid != $ppid;    # the test is gone
		my $now = time;
		$self->_timers($now);
		my $rsel = IO::Select->new($listener, $ctl);
		my $wsel = IO::Select->new;
		my $wake = $now + 0.2;
		for my $c (values %{ $self->{conns} })
		{
			$self->_select_conn($c, $rsel, $wsel, \$wake);
		}
		my $timeout = $wake - time;
		$timeout = 0 if $timeout < 0;
		my ($r, $w) = IO::Select->select($rsel, $wsel, undef, $timeout);
		$now = time;
		for my $fh (@{ $w // [] })
		{
			my $fd = fileno $fh;
			next unless defined $fd;
			my $c = $self->{by_fd}{$fd} or next;
			$self->_write_ready($c, $fh == ($c->{c} // 0) ? 'bf' : 'fb', $now);
		}
		for my $fh (@{ $r // [] })
		{
			if ($fh == $listener)
			{
				$self->_accept($listener, $now);
			}
			elsif ($fh == $ctl)
			{
				my $n = sysread($ctl, my $buf, 4096);
				if (!$n)
				{
					$self->_log('control channel closed: exiting');
					$stop = 1;
					last;
				}
				$ctl_in .= $buf;
				while ($ctl_in =~ s/^([^\n]*)\n//)
				{
					my $reply = $self->_control($1, \$stop);
					syswrite($ctl, "$reply\n");
				}
			}
			else
			{
				my $fd = fileno $fh;
				next unless defined $fd;
				my $c = $self->{by_fd}{$fd} or next;
				next if $c->{dead};
				$self->_read_ready($c, $fh == ($c->{c} // 0) ? 'fb' : 'bf', $now);
			}
		}
		$self->_reap;
	}
	$self->_log('stopping: closing every connection');
	$self->_close_conn($_, 'fin', 'proxy stopping') for values %{ $self->{conns} };
	return;
}

sub _reset_mode
{
	my ($self) = @_;
	$self->{delay_ms}         = 0;
	$self->{connect_delay_ms} = 0;
	$self->{frozen}           = 0;
	$self->{refusing}         = 0;
	$self->{rules}            = [];
	return;
}

sub _mode_text
{
	my ($self) = @_;
	my @m;
	push @m, "delay:$self->{delay_ms}" if $self->{delay_ms};
	push @m, "connect_delay:$self->{connect_delay_ms}" if $self->{connect_delay_ms};
	push @m, 'freeze' if $self->{frozen};
	push @m, 'refuse' if $self->{refusing};
	return @m ? join(',', @m) : 'pass';
}

sub _control
{
	my ($self, $line, $stop) = @_;
	my ($verb, @args) = split ' ', $line;
	$verb //= '';
	my %a = map { split /=/, $_, 2 } grep { /=/ } @args;
	$self->_log("command: $line") unless $verb eq 'stats' || $verb eq 'ping';
	if ($verb eq 'ping') { return 'ok pong'; }
	if ($verb eq 'quit') { $$stop = 1; return 'ok bye'; }
	if ($verb eq 'pass')
	{
		$self->_reset_mode;
		return 'ok';
	}
	if ($verb eq 'delay' && defined $args[0] && $args[0] =~ /^\d+$/)
	{
		$self->{delay_ms} = $args[0];
		return 'ok';
	}
	if ($verb eq 'connect_delay' && defined $args[0] && $args[0] =~ /^\d+$/)
	{
		$self->{connect_delay_ms} = $args[0];
		return 'ok';
	}
	if ($verb eq 'freeze') { $self->{frozen} = 1; return 'ok'; }
	if ($verb eq 'thaw')   { $self->{frozen} = 0; return 'ok'; }
	if ($verb eq 'close_all' || $verb eq 'reset_all' || $verb eq 'refuse')
	{
		my $how = $verb eq 'close_all' ? 'fin' : 'rst';
		my $n = 0;
		for my $c (values %{ $self->{conns} })
		{
			next if $c->{dead};
			$self->_close_conn($c, $how, $verb);
			$n++;
		}
		$self->{stat}{actions} += $n;
		$self->{refusing} = 1 if $verb eq 'refuse';
		$self->_reap;
		return "ok closed=$n";
	}
	if ($verb eq 'clear_rules') { $self->{rules} = []; return 'ok'; }
	if ($verb eq 'kill' || $verb eq 'garble')
	{
		my %r = (action => $verb, id => $self->{next_rule}++, seen => 0, fired => 0);
		return 'err dir' unless ($a{dir} // '') =~ /^(fb|bf)$/;
		$r{dir} = $a{dir};
		$r{type} = pack('H*', $a{type} // '');
		return 'err type' unless length $r{type};
		$r{n} = $a{n} // 1;
		return 'err n' unless $r{n} =~ /^\d+$/ && $r{n} >= 1;
		$r{times} = $a{times} // 1;
		return 'err times' unless $r{times} =~ /^\d+$/;
		$r{how} = $a{how} // 'rst';
		return 'err how' unless $r{how} =~ /^(fin|rst)$/;
		$r{byte} = defined $a{byte} ? pack('H*', $a{byte}) : '!';
		return 'err byte' unless length $r{byte} == 1;
		if (defined $a{match})
		{
			my $re = pack('H*', $a{match});
			$r{match_text} = $re;
			$r{match} = eval { qr/$re/ } or return "err match: $@";
		}
		push @{ $self->{rules} }, \%r;
		$self->_log(sprintf('rule %d armed: %s', $r{id}, _rule_text(\%r)));
		return "ok $r{id}";
	}
	if ($verb eq 'stats')
	{
		my $open = grep { !$_->{dead} } values %{ $self->{conns} };
		my %s = (%{ $self->{stat} }, open => $open, rules => scalar @{ $self->{rules} },
			mode => $self->_mode_text);
		for my $k (keys %{ $self->{msgs} })
		{
			$s{"msgs_$k"} = $self->{msgs}{$k};
		}
		return 'ok ' . join(' ', map { "$_=$s{$_}" } sort keys %s);
	}
	return "err unknown command: $line";
}

sub _rule_text
{
	my ($r) = @_;
	my $t = sprintf('%s %s %s n=%d times=%d', $r->{action}, $r->{dir},
		_type_name($r->{type}), $r->{n}, $r->{times});
	$t .= " how=$r->{how}" if $r->{action} eq 'kill';
	$t .= sprintf(' byte=0x%02x', ord $r->{byte}) if $r->{action} eq 'garble';
	$t .= " match=/$r->{match_text}/" if defined $r->{match};
	return $t;
}

sub _type_name
{
	my ($t) = @_;
	return $t if length $t > 1;
	return $t =~ /^[[:print:]]$/ ? "'$t'" : sprintf('0x%02x', ord $t);
}

sub _accept
{
	my ($self, $listener, $now) = @_;
	while (my $client = $listener->accept)
	{
		my $id = $self->{next_id}++;
		$self->{stat}{accepted}++;
		$client->blocking(0);
		if ($self->{refusing})
		{
			$self->{stat}{refused}++;
			$self->{stat}{actions}++;
			$self->_log("conn $id: accepted from port " . $client->peerport . ': refused (RST)');
			_reset_socket($client);
			next;
		}
		my $c = {
			id      => $id,
			c       => $client,
			state   => 'connecting_wait',
			connect_at => $now + $self->{connect_delay_ms} / 1000,
			query   => '',
			startup => 1,
			answer_pending => 0,
			raw     => 0,
			in_fb   => '',
			in_bf   => '',
			out_fb  => [],
			out_bf  => [],
			wbuf_fb => '',
			wbuf_bf => '',
		};
		$self->{conns}{$id} = $c;
		$self->{by_fd}{ fileno $client } = $c;
		$self->_log("conn $id: accepted from port " . $client->peerport
			  . ($self->{connect_delay_ms} ? "; upstream connect in $self->{connect_delay_ms} ms" : ''));
	}
	return;
}

sub _connect_upstream
{
	my ($self, $c, $now) = @_;
	my $u = IO::Socket::INET->new(
		PeerAddr => $self->{upstream_host},
		PeerPort => $self->{upstream_port},
		Proto    => 'tcp',
		Timeout  => 2);
	if (!$u)
	{
		$self->{stat}{upstream_failed}++;
		$self->_log("conn $c->{id}: upstream connect failed: $@ $!; resetting the client");
		$self->_close_conn($c, 'rst', 'upstream connect failed');
		return;
	}
	$u->blocking(0);
	$c->{u} = $u;
	$c->{state} = 'open';
	$self->{by_fd}{ fileno $u } = $c;
	$self->_log("conn $c->{id}: connected upstream from port " . $u->sockport);
	return;
}

sub _timers
{
	my ($self, $now) = @_;
	return if $self->{frozen};
	for my $c (values %{ $self->{conns} })
	{
		next if $c->{dead};
		if ($c->{state} eq 'connecting_wait' && $now >= $c->{connect_at})
		{
			$self->_connect_upstream($c, $now);
			next if $c->{dead};
			# What the client sent meanwhile was parsed already; it is queued.
		}
		$self->_move_due($c, $_, $now) for ('fb', 'bf');
	}
	return;
}

# Move the messages of direction $d that are due to the write buffer; an EOF marker
# becomes a close once everything before it is written.
sub _move_due
{
	my ($self, $c, $d, $now) = @_;
	return if $c->{dead} || $c->{state} eq 'connecting_wait' || $self->{frozen};
	my $q = $c->{"out_$d"};
	while (@$q && $q->[0][0] <= $now && !$c->{"eofq_$d"})
	{
		my $item = shift @$q;
		if (defined $item->[1])
		{
			$c->{"wbuf_$d"} .= $item->[1];
		}
		else
		{
			$c->{"eofq_$d"} = $item->[2] // 'fin';
		}
	}
	return;
}

sub _select_conn
{
	my ($self, $c, $rsel, $wsel, $wake) = @_;
	return if $c->{dead};
	if ($c->{state} eq 'connecting_wait')
	{
		$$wake = $c->{connect_at} if !$self->{frozen} && $c->{connect_at} < $$wake;
	}
	for my $d ('fb', 'bf')
	{
		my $q = $c->{"out_$d"};
		$$wake = $q->[0][0] if !$self->{frozen} && @$q && $q->[0][0] < $$wake;
	}
	return if $self->{frozen};
	my %sock = (fb => $c->{c}, bf => $c->{u});    # the sender of each direction
	my %dest = (fb => $c->{u}, bf => $c->{c});    # the receiver of each direction
	for my $d ('fb', 'bf')
	{
		# Read from the sender unless it closed, we are closing, or the receiver lags.
		$rsel->add($sock{$d})
		  if $sock{$d} && !$c->{"eof_$d"} && $c->{state} ne 'closing'
		  && length($c->{"wbuf_$d"}) < 1_048_576;
		$wsel->add($dest{$d})
		  if $dest{$d} && $c->{state} ne 'connecting_wait' && length $c->{"wbuf_$d"};
		# Nothing left to write but an EOF to pass on, and the connection may close: do it
		# now (a FIN close waits for both directions; no spinning meanwhile).
		if (   $dest{$d}
			&& $c->{"eofq_$d"}
			&& !length $c->{"wbuf_$d"}
			&& (!$c->{fin_requested} || _fin_flushed($c)))
		{
			$$wake = 0;
		}
	}
	return;
}

sub _read_ready
{
	my ($self, $c, $d, $now) = @_;
	my $fh = $d eq 'fb' ? $c->{c} : $c->{u};
	my $n = sysread($fh, my $buf, 65536);
	if (!defined $n)
	{
		return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
		my $err = "$!";
		$self->_log("conn $c->{id}: read error from the "
			  . ($d eq 'fb' ? 'client' : 'upstream') . ": $err; resetting both sides");
		$self->_close_conn($c, 'rst', "read error ($err)");
		return;
	}
	if ($n == 0)
	{
		$c->{"eof_$d"} = 1;
		$self->_log("conn $c->{id}: EOF from the " . ($d eq 'fb' ? 'client' : 'upstream'));
		$self->_enqueue($c, $d, undef, $now);
		return;
	}
	$c->{"in_$d"} .= $buf;
	$self->_parse($c, $d, $now);
	return;
}

sub _enqueue
{
	my ($self, $c, $d, $bytes, $now) = @_;
	push @{ $c->{"out_$d"} }, [ $now + $self->{delay_ms} / 1000, $bytes ];
	$self->_move_due($c, $d, $now);
	return;
}

# Split what was read into whole messages and pass each through the rules.
sub _parse
{
	my ($self, $c, $d, $now) = @_;
	my $in = \$c->{"in_$d"};
	while (length $$in && !$c->{dead} && $c->{state} ne 'closing')
	{
		if ($c->{raw})
		{
			$self->_enqueue($c, $d, $$in, $now);
			$$in = '';
			return;
		}
		my ($type, $len, $hdr);
		if ($d eq 'fb' && $c->{startup})
		{
			return if length $$in < 8;
			($len, my $code) = unpack('NN', $$in);
			$hdr = 0;
			if ($len == 8 && $code == $SSL_REQUEST)
			{
				$type = 'ssl';
				$c->{answer_pending}++;
			}
			elsif ($len == 8 && $code == $GSSENC_REQUEST)
			{
				$type = 'gss';
				$c->{answer_pending}++;
			}
			elsif ($len == 16 && $code == $CANCEL_REQUEST)
			{
				$type = 'cancel';
			}
			else
			{
				$type = 'startup';
			}
		}
		elsif ($d eq 'bf' && $c->{answer_pending})
		{
			$type = 'sslanswer';
			$len = 1;
			$hdr = 0;
		}
		else
		{
			return if length $$in < 5;
			($type, $len) = unpack('aN', $$in);
			$hdr = 1;
		}
		if ($len < ($hdr ? 4 : 1) || $len > 1_073_741_824 + 64)
		{
			$self->_log(sprintf('conn %d: %s: impossible length %d after type %s: raw from now on',
					$c->{id}, $d, $len, _type_name($type)));
			$c->{raw} = 1;
			next;
		}
		my $total = $len + $hdr;
		return if length $$in < $total;
		my $msg = substr($$in, 0, $total, '');
		if ($type eq 'startup')
		{
			$c->{startup} = 0;
		}
		elsif ($type eq 'sslanswer')
		{
			$c->{answer_pending}--;
			if ($msg ne 'N')
			{
				$self->_log("conn $c->{id}: encryption accepted ('$msg'): raw from now on");
				$c->{raw} = 1;
			}
		}
		elsif ($d eq 'fb' && $type eq 'Q')
		{
			$c->{query} = unpack('Z*', substr($msg, 5));
		}
		elsif ($d eq 'fb' && $type eq 'P')
		{
			my ($stmt, $q) = unpack('Z*Z*', substr($msg, 5));
			$c->{query} = $q // '';
		}
		$msg = $self->_apply_rules($c, $d, $type, $msg, $now);
		next unless defined $msg;
		$self->{msgs}{"${d}_" . ($type =~ /^[A-Za-z0-9]$/ || length $type > 1 ? $type : sprintf('x%02x', ord $type))}++;
		$self->_enqueue($c, $d, $msg, $now);
	}
	return;
}

# Returns the message to forward (maybe garbled), or undef when a rule killed the
# connection.
sub _apply_rules
{
	my ($self, $c, $d, $type, $msg, $now) = @_;
	my @keep;
	my $result = $msg;
	for my $r (@{ $self->{rules} })
	{
		if (   defined $result
			&& $r->{dir} eq $d
			&& $r->{type} eq $type
			&& (!defined $r->{match} || $c->{query} =~ $r->{match}))
		{
			$r->{seen}++;
			if ($r->{seen} >= $r->{n})
			{
				$r->{seen} = 0;
				$r->{fired}++;
				$self->{stat}{fired}++;
				$self->{stat}{actions}++;
				my $q = $c->{query};
				$q = substr($q, 0, 77) . '...' if length $q > 80;
				$q =~ s/\s+/ /g;
				if ($r->{action} eq 'kill')
				{
					$self->_log(sprintf('conn %d: rule %d fired (%s, #%d): %s at %s %s; query: %s',
							$c->{id}, $r->{id}, _rule_text($r), $r->{fired},
							uc $r->{how}, $d, _type_name($type), $q));
					$self->_close_conn($c, $r->{how}, "rule $r->{id}");
					$result = undef;
				}
				else
				{
					$self->_log(sprintf('conn %d: rule %d fired (%s, #%d): type byte %s -> 0x%02x at %s; query: %s',
							$c->{id}, $r->{id}, _rule_text($r), $r->{fired},
							_type_name($type), ord $r->{byte}, $d, $q));
					if (length $type == 1)
					{
						substr($result, 0, 1) = $r->{byte};
					}
					else
					{
						# Untyped startup message: garble its first length byte instead.
						substr($result, 0, 1) = $r->{byte};
					}
				}
				next if $r->{times} && $r->{fired} >= $r->{times};    # disarmed
			}
		}
		push @keep, $r;
	}
	$self->{rules} = \@keep;
	return $result;
}

sub _write_ready
{
	my ($self, $c, $d, $now) = @_;
	return if $c->{dead} || $self->{frozen};
	my $fh = $d eq 'fb' ? $c->{u} : $c->{c};
	return unless $fh && length $c->{"wbuf_$d"};
	my $n = syswrite($fh, $c->{"wbuf_$d"});
	if (!defined $n)
	{
		return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
		my $err = "$!";
		$self->_log("conn $c->{id}: write error to the "
			  . ($d eq 'fb' ? 'upstream' : 'client') . ": $err; resetting both sides");
		$self->_close_conn($c, 'rst', "write error ($err)");
		return;
	}
	substr($c->{"wbuf_$d"}, 0, $n, '');
	$self->_move_due($c, $d, $now);
	return;
}

# Close both sides. 'rst': at once, SO_LINGER 0. 'fin': forward what is already
# queued for each side first (in _reap), then close.
sub _close_conn
{
	my ($self, $c, $how, $why) = @_;
	return if $c->{dead};
	if ($how eq 'rst')
	{
		for my $s ($c->{c}, $c->{u})
		{
			next unless $s;
			delete $self->{by_fd}{ fileno $s };
			_reset_socket($s);
		}
		$c->{dead} = 1;
		$self->_log("conn $c->{id}: reset both sides (RST): $why");
		return;
	}
	# FIN: stop reading; drop what is not yet queued; close once the queues are written.
	$c->{state} = 'closing' unless $c->{state} eq 'connecting_wait' && !$c->{u};
	$c->{closing_why} = $why;
	$c->{in_fb} = $c->{in_bf} = '';
	push @{ $c->{out_fb} }, [ 0, undef, 'fin' ];
	push @{ $c->{out_bf} }, [ 0, undef, 'fin' ];
	$c->{fin_requested} = 1;
	$self->_move_due($c, $_, time) for ('fb', 'bf');
	$self->_finish_fin($c) if !$c->{u} || $self->{frozen} || _fin_flushed($c);
	return;
}

# A FIN close may proceed: both directions reached their close marker, all written.
sub _fin_flushed
{
	my ($c) = @_;
	return $c->{eofq_fb} && $c->{eofq_bf} && !length $c->{wbuf_fb} && !length $c->{wbuf_bf};
}

sub _finish_fin
{
	my ($self, $c) = @_;
	for my $s ($c->{c}, $c->{u})
	{
		next unless $s;
		delete $self->{by_fd}{ fileno $s };
		shutdown($s, SHUT_WR);
		close $s;
	}
	$c->{dead} = 1;
	$self->_log("conn $c->{id}: closed both sides (FIN): " . ($c->{closing_why} // 'EOF'));
	return;
}

sub _reset_socket
{
	my ($s) = @_;
	setsockopt($s, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
	close $s;
	return;
}

# Close connections that are done: an EOF (or a FIN close) reached the head of a
# direction's queue and everything before it is written.
sub _reap
{
	my ($self) = @_;
	for my $c (values %{ $self->{conns} })
	{
		if (!$c->{dead} && !$self->{frozen} && $c->{fin_requested})
		{
			$self->_finish_fin($c) if _fin_flushed($c);
		}
		elsif (!$c->{dead} && !$self->{frozen})
		{
			for my $d ('fb', 'bf')
			{
				if ($c->{"eofq_$d"} && !length $c->{"wbuf_$d"})
				{
					# One side is finished (EOF passed on, or a FIN close): close both.
					$c->{closing_why} //= ($d eq 'fb' ? 'client' : 'upstream') . ' closed';
					$self->_finish_fin($c);
					last;
				}
			}
		}
		if ($c->{dead})
		{
			delete $self->{conns}{ $c->{id} };
			$self->{stat}{closed}++;
		}
	}
	return;
}

1;
