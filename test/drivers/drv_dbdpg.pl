#!/usr/bin/perl
# Perl DBD::Pg (libpq; server-side named statements dbdpg_p<pid>_<n> through
# PQprepare/PQexecPrepared, DEALLOCATE when a statement handle goes) against one
# target. Run by test/integration/drivers.test.ts as
#   perl drv_dbdpg.pl '<json config>'
# and prints one JSON object on its last line (see test/drivers/common.py for the
# config). Without DBD::Pg it prints {"skipped": "..."}.
use strict;
use warnings;
use JSON::PP;

my $cfg = decode_json($ARGV[0]);
my $json = JSON::PP->new->canonical;
if (!eval { require DBI; require DBD::Pg; 1 }) {
    print $json->encode({ skipped => 'Perl DBD::Pg is not installed (Debian: libdbd-pg-perl)' }), "\n";
    exit 0;
}
DBD::Pg->import(':async');

my $t = $cfg->{target};
my $dsn = "dbi:Pg:dbname=$t->{dbname};host=$t->{host};port=$t->{port}";
my $table = "drv_dbdpg_$cfg->{suffix}";

sub handle {
    my (%attrs) = @_;
    return DBI->connect($dsn, $t->{user}, $t->{password}, { RaiseError => 1, PrintError => 0, AutoCommit => 1, %attrs });
}

# One step's outcome, as the comparison with direct needs: its value or its SQLSTATE.
sub step {
    my ($code) = @_;
    my $value = eval { $code->() };
    return { ok => JSON::PP::true, value => $value } unless $@;
    my $message = (split /\n/, "$@")[0];
    my $state = do { no warnings 'once'; $DBI::state } || 'perl';
    return { ok => JSON::PP::false, sqlstate => $state, message => $message };
}

my %result;
my $setup = handle();
$setup->do("DROP TABLE IF EXISTS $table");
$setup->do("CREATE TABLE $table (id serial PRIMARY KEY, who text)");

# DBD::Pg's basics, two clients taking turns: named statements kept across
# transactions and freed, an async query and its cancel, COPY both ways, a
# savepoint rolled back to, ping.
{
    my @clients = (handle(), handle());
    my %basics = (errors => [], rounds => 0);
    for my $round (1 .. 10) {
        for my $k (0, 1) {
            my $dbh = $clients[$k];
            my $who = "basics$k";
            my $ok = eval {
                my $sth = $dbh->prepare('SELECT ?::int + 1');
                $sth->execute($round);
                my ($next) = $sth->fetchrow_array;
                die "prepared: $next\n" unless $next == $round + 1;
                $sth->execute($round + 1);
                ($next) = $sth->fetchrow_array;
                die "prepared again: $next\n" unless $next == $round + 2;
                undef $sth;
                $dbh->begin_work;
                $dbh->do("INSERT INTO $table (who) VALUES (?)", undef, $who);
                $dbh->pg_savepoint('sp');
                eval { $dbh->do('SELECT 1/0') };
                $dbh->pg_rollback_to('sp');
                $dbh->do("INSERT INTO $table (who) VALUES (?)", undef, $who);
                $dbh->commit;
                $dbh->do('COPY ' . $table . ' (who) FROM STDIN');
                $dbh->pg_putcopydata("$who\n");
                $dbh->pg_putcopyend;
                $dbh->do("COPY (SELECT count(*) FROM $table WHERE who = '$who') TO STDOUT");
                my ($line, @rows) = ('');
                push @rows, $line while $dbh->pg_getcopydata($line) >= 0;
                die "copy: $rows[0]\n" unless $rows[0] == 3 * $round;
                my $async = $dbh->prepare('SELECT ?::int * 2', { pg_async => DBD::Pg::PG_ASYNC() });
                $async->execute($round);
                $async->pg_result;
                my ($double) = $async->fetchrow_array;
                die "async: $double\n" unless $double == 2 * $round;
                if ($round % 5 == 0) {
                    $dbh->do('SELECT pg_sleep(5)', { pg_async => DBD::Pg::PG_ASYNC() });
                    select undef, undef, undef, 0.1;
                    $dbh->pg_cancel or die "pg_cancel failed\n";
                    my ($seven) = $dbh->selectrow_array('SELECT 7');
                    die "after cancel: $seven\n" unless $seven == 7;
                }
                die "ping\n" unless $dbh->ping;
                1;
            };
            push @{ $basics{errors} }, "round $round client $k: " . (split /\n/, "$@")[0] unless $ok;
        }
        $basics{rounds} += 1;
    }
    $_->disconnect for @clients;
    $result{basics} = \%basics;
}

# last_insert_id: SELECT pg_catalog.currval(?) as a named statement. With
# AutoCommit on it runs in a transaction of its own; direct, it reads the
# client's own INSERT whatever other clients did in between.
sub last_ids {
    my ($label, $autocommit, @names) = @_;
    my %clients = map { $_ => handle(AutoCommit => $autocommit) } @names;
    my %counts = (own => 0, other => 0, reads => 0, refused => [], errors => []);
    my %inserted;
    for my $round (1 .. 4) {
        for my $name (@names) {
            my $dbh = $clients{$name} or next;
            my $r = step(sub { $dbh->selectrow_array("INSERT INTO $table (who) VALUES (?) RETURNING id", undef, "$label-$name") });
            $inserted{$r->{value}} = $name if $r->{ok};
        }
        for my $name (@names) {
            my $dbh = $clients{$name} or next;
            my $r = step(sub { $dbh->last_insert_id(undef, undef, $table, undef) });
            $counts{reads} += 1;
            if (!$r->{ok}) {
                my $list = $r->{message} =~ /currval\(\) and lastval\(\)/ ? 'refused' : 'errors';
                push @{ $counts{$list} }, "$r->{sqlstate} $r->{message}";
                # A refusal closes the client, as its FATAL says.
                delete $clients{$name};
                next;
            }
            $counts{ ($inserted{ $r->{value} } // '') eq $name ? 'own' : 'other' } += 1;
            $dbh->commit unless $autocommit;
        }
    }
    $_->disconnect for values %clients;
    return \%counts;
}
$result{lastInsertIdAlone} = last_ids('alone', 1, 'a');
$result{lastInsertIdTurns} = last_ids('turns', 1, 'a', 'b');
$result{lastInsertIdInTransaction} = last_ids('block', 0, 'a', 'b');

$setup->do("DROP TABLE IF EXISTS $table");
$setup->disconnect;
print $json->encode(\%result), "\n";
