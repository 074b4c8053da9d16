# Copyright (c) pg_peerpool contributors
#
# scripts/deps.sh and the build must agree (issue 10): deps.sh decides what to install by
# probing files, and a probe that passes while the build would fail is how `make demo` once
# stopped at "postgres.h: No such file or directory" on a fresh machine (Debian's
# postgresql-client-15 ships pgxs.mk without the server headers).
#
# 1. Against the PostgreSQL under test, deps.sh's verdict for postgresql-server-dev-15 must
#    equal an independent check of what the build really uses: every PostgreSQL header that
#    src/ and include/ #include, pgxs.mk, and the TAP framework. When it says "nothing
#    missing", g++, make, IPC::Run, dblink, clang-format, pgbouncer and pg_auto_failover must
#    exist too.
# 2. Against a scratch pg_config whose server include directory is empty but whose pgxs.mk
#    exists (the fresh-machine case), deps.sh must want postgresql-server-dev-15.
# DEPS_DRY_RUN=1 makes deps.sh print its verdict instead of running apt-get.
use strict;
use warnings FATAL => 'all';

use File::Basename qw(dirname);
use File::Find;
use File::Temp qw(tempdir);
use Test::More;

sub find_in_path
{
	my ($cmd) = @_;
	for my $dir (split /:/, $ENV{PATH} // '')
	{
		return "$dir/$cmd" if $dir ne '' && -x "$dir/$cmd";
	}
	return undef;
}

# The PostgreSQL under test: PG_CONFIG (make passes it on), else the pg_config next to the
# binaries PGXS puts first in PATH.
my $pg_config = $ENV{PG_CONFIG};
$pg_config = find_in_path('pg_config') unless defined $pg_config && -x $pg_config;
ok(defined $pg_config && -x $pg_config, 'a pg_config to test against')
  or BAIL_OUT('no pg_config');
note "pg_config: $pg_config";

sub pg_config_value
{
	my ($config, $option) = @_;
	my $v = `'$config' $option`;
	chomp $v;
	return $v;
}

sub deps_dry_run
{
	my ($config) = @_;
	my $out = `DEPS_DRY_RUN=1 PG_CONFIG='$config' bash scripts/deps.sh 2>&1`;
	my $rc = $? >> 8;
	chomp $out;
	return ($rc, $out);
}

# The packages a dry run names ('' for "nothing missing").
sub wanted
{
	my ($out) = @_;
	return ()         if $out eq 'deps: nothing missing';
	return split ' ', $1 if $out =~ /^deps: would install (.+)$/;
	return ('UNPARSEABLE');
}

my $includedir_server = pg_config_value($pg_config, '--includedir-server');
my $includedir = pg_config_value($pg_config, '--includedir');
my $pgxs = pg_config_value($pg_config, '--pgxs');
my $sharedir = pg_config_value($pg_config, '--sharedir');
my $bindir = pg_config_value($pg_config, '--bindir');

# Every PostgreSQL/libpq header our sources include ("..." includes that are not our own).
my %headers;
find(
	sub {
		return unless /\.(?:cpp|hpp)$/;
		open my $fh, '<', $_ or die "$File::Find::name: $!";
		while (<$fh>)
		{
			$headers{$1} = 1 if /^\s*#\s*include\s+"([^"]+)"/ && $1 !~ m{^pg_peerpool/};
		}
		close $fh;
	},
	'src', 'include');
ok(exists $headers{'postgres.h'} && keys %headers > 20,
	sprintf('found the PostgreSQL headers the sources include (%d)', scalar keys %headers));
my @unresolved =
  grep { !-f "$includedir_server/$_" && !-f "$includedir/$_" } sort keys %headers;
my $pgxs_root = dirname(dirname(dirname($pgxs)));
my $build_has_dev =
	 !@unresolved
  && -f $pgxs
  && -f "$pgxs_root/src/test/perl/PostgreSQL/Test/Cluster.pm";
note 'headers not found: ' . join(' ', @unresolved) if @unresolved;

# 1. The real installation.
my ($rc, $out) = deps_dry_run($pg_config);
is($rc, 0, 'deps.sh dry run succeeds');
note "deps.sh says: $out";
my %want = map { $_ => 1 } wanted($out);
ok(!$want{UNPARSEABLE}, 'dry run output is understood');
is(!!$want{'postgresql-server-dev-15'}, !$build_has_dev,
	'deps.sh wants postgresql-server-dev-15 exactly when the build lacks a header, pgxs.mk or the TAP framework'
);
if (!%want)
{
	ok(defined find_in_path('g++'),  'nothing missing: g++ exists');
	ok(defined find_in_path('make'), 'nothing missing: make exists');
	ok(-x "$bindir/postgres",        'nothing missing: the server exists');
	ok(system('perl', '-MIPC::Run', '-e', '1') == 0, 'nothing missing: IPC::Run loads');
	ok(-f "$sharedir/extension/dblink.control", 'nothing missing: contrib (dblink) exists');
	ok(defined find_in_path('clang-format'), 'nothing missing: clang-format exists');
	ok(-x '/usr/sbin/pgbouncer', 'nothing missing: pgbouncer exists (t/071)');
	ok(defined find_in_path('pg_autoctl') && -f "$sharedir/extension/pgautofailover.control",
		'nothing missing: pg_auto_failover exists (t/072)');
}

# 2. A fresh machine: pg_config and pgxs.mk exist (postgresql-client-15), the headers do not.
my $fake = tempdir('peerpool_deps_XXXXXX', TMPDIR => 1, CLEANUP => 1);
mkdir "$fake/bin";
mkdir "$fake/include";
mkdir "$fake/server";
symlink("$bindir/postgres", "$fake/bin/postgres") or die "symlink: $!";
open my $fh, '>', "$fake/bin/pg_config" or die $!;
print $fh <<"SH";
#!/bin/sh
case "\$1" in
--includedir-server) echo '$fake/server' ;;
--includedir) echo '$fake/include' ;;
*) exec '$pg_config' "\$@" ;;
esac
SH
close $fh;
chmod 0755, "$fake/bin/pg_config";

($rc, $out) = deps_dry_run("$fake/bin/pg_config");
is($rc, 0, 'dry run without headers succeeds');
note "deps.sh says: $out";
my @fresh = wanted($out);
ok((grep { $_ eq 'postgresql-server-dev-15' } @fresh),
	'headers absent, pgxs.mk present: deps.sh would install postgresql-server-dev-15');
ok(!(grep { $_ eq 'postgresql-15' } @fresh), 'and not the server, which is there');
if (!%want)
{
	is($out, 'deps: would install postgresql-server-dev-15',
		'nothing else, since the rest of this machine is complete');
}

# The same with only the TAP framework missing (a PGXS tree without src/test/perl).
mkdir "$fake/pgxs";
mkdir "$fake/pgxs/src";
mkdir "$fake/pgxs/src/makefiles";
symlink($pgxs, "$fake/pgxs/src/makefiles/pgxs.mk") or die "symlink: $!";
open $fh, '>', "$fake/bin/pg_config" or die $!;
print $fh <<"SH";
#!/bin/sh
case "\$1" in
--pgxs) echo '$fake/pgxs/src/makefiles/pgxs.mk' ;;
*) exec '$pg_config' "\$@" ;;
esac
SH
close $fh;
($rc, $out) = deps_dry_run("$fake/bin/pg_config");
ok((grep { $_ eq 'postgresql-server-dev-15' } wanted($out)),
	'TAP framework absent: deps.sh would install postgresql-server-dev-15');

done_testing();
