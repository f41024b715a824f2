<?php
// PHP's PDO_pgsql and pgsql extensions (both on libpq) against one target. Run by
// test/integration/drivers.test.ts as
//   php drv_php.php '<json config>'
// and prints one JSON object on its last line (see test/drivers/common.py for the
// config). Without the extensions it prints {"skipped": "..."}.
//
// PDO with ATTR_EMULATE_PREPARES off prepares each statement server-side under
// pdo_stmt_%08x (a counter per connection, so two connections use the same names)
// at its first execute, and sends DEALLOCATE as a simple Query when the statement
// object is destroyed; lastInsertId() runs SELECT CURRVAL($1) (SELECT LASTVAL()
// without a sequence name).

$cfg = json_decode($argv[1], true);
if (!extension_loaded('pdo_pgsql') || !extension_loaded('pgsql')) {
    echo json_encode(['skipped' => 'PHP pdo_pgsql and pgsql are not installed (Debian: php-cli php-pgsql)']), "\n";
    exit(0);
}
error_reporting(E_ALL & ~E_WARNING & ~E_NOTICE);

$t = $cfg['target'];
$table = "drv_php_{$cfg['suffix']}";
$pdoDsn = "pgsql:host={$t['host']};port={$t['port']};dbname={$t['dbname']}";
$pgConninfo = "host={$t['host']} port={$t['port']} dbname={$t['dbname']} user={$t['user']} password={$t['password']} connect_timeout=10";

function pdo(array $attrs = []): PDO
{
    global $pdoDsn, $t;
    return new PDO($pdoDsn, $t['user'], $t['password'], $attrs + [
        PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
        PDO::ATTR_EMULATE_PREPARES => false,
        PDO::ATTR_DEFAULT_FETCH_MODE => PDO::FETCH_NUM,
    ]);
}

function pg()
{
    global $pgConninfo;
    $c = pg_connect($pgConninfo, PGSQL_CONNECT_FORCE_NEW);
    if ($c === false) throw new RuntimeException('pg_connect failed');
    return $c;
}

/** A PDO error's SQLSTATE (its code), or the class name. */
function sqlstateOf(Throwable $e): string
{
    if ($e instanceof PDOException && is_array($e->errorInfo) && isset($e->errorInfo[0]) && $e->errorInfo[0] !== '') return $e->errorInfo[0];
    if ($e instanceof PgError) return $e->sqlstate;
    return get_class($e);
}

/** One step's outcome, as the comparison with direct needs: its value or its SQLSTATE. */
function step(callable $fn): array
{
    try {
        return ['ok' => true, 'value' => $fn()];
    } catch (Throwable $e) {
        return ['ok' => false, 'sqlstate' => sqlstateOf($e), 'message' => strtok($e->getMessage(), "\n")];
    }
}

final class PgError extends RuntimeException
{
    public string $sqlstate;

    public function __construct(string $sqlstate, string $message)
    {
        parent::__construct($message);
        $this->sqlstate = $sqlstate;
    }
}

/** The pgsql extension's result of one sent query: its rows, or a PgError with the SQLSTATE. */
function pgResult($c): array
{
    $rows = null;
    $error = null;
    while (($r = pg_get_result($c)) !== false) {
        $state = pg_result_error_field($r, PGSQL_DIAG_SQLSTATE);
        if ($state) $error ??= new PgError($state, (string) pg_result_error_field($r, PGSQL_DIAG_MESSAGE_PRIMARY));
        else $rows ??= pg_fetch_all($r, PGSQL_NUM) ?: [];
    }
    if ($error) throw $error;
    if ($rows === null) throw new PgError('08006', pg_last_error($c) ?: 'no result');
    return $rows;
}

function pgQuery($c, string $sql, array $params = []): array
{
    if (!($params ? pg_send_query_params($c, $sql, $params) : pg_send_query($c, $sql))) throw new PgError('08006', pg_last_error($c));
    return pgResult($c);
}

function pgExecute($c, string $name, array $params): array
{
    if (!pg_send_execute($c, $name, $params)) throw new PgError('08006', pg_last_error($c));
    return pgResult($c);
}

$result = [];
$setup = pdo();
$setup->exec("DROP TABLE IF EXISTS $table");
$setup->exec("CREATE TABLE $table (id serial PRIMARY KEY, who text, n int)");
$seq = "{$table}_id_seq";

// PDO named statements, two connections taking turns: a statement kept across
// rounds and transactions, one prepared and destroyed (DEALLOCATE) each round,
// a transaction rolled back after an error.
$result['pdoStatements'] = (function () use ($table) {
    $clients = [pdo(), pdo()];
    $kept = [];
    foreach ($clients as $k => $pdo) $kept[$k] = $pdo->prepare('SELECT ?::int * 10 + ' . $k);
    $errors = [];
    $rounds = 0;
    for ($round = 1; $round <= 10; $round++) {
        foreach ($clients as $k => $pdo) {
            try {
                $kept[$k]->execute([$round]);
                $v = $kept[$k]->fetchColumn();
                if ($v != $round * 10 + $k) throw new RuntimeException("kept statement: $v");
                $once = $pdo->prepare('SELECT ?::text || ' . $pdo->quote("-$k"));
                $once->execute(["r$round"]);
                if (($v = $once->fetchColumn()) !== "r$round-$k") throw new RuntimeException("statement of the round: $v");
                $pdo->beginTransaction();
                $once->execute(["t$round"]);
                if (($v = $once->fetchColumn()) !== "t$round-$k") throw new RuntimeException("in a transaction: $v");
                $insert = $pdo->prepare("INSERT INTO $table (who, n) VALUES (?, ?)");
                $insert->execute(["pdo$k", $round]);
                $kept[$k]->execute([$round + 1]);
                if (($v = $kept[$k]->fetchColumn()) != ($round + 1) * 10 + $k) throw new RuntimeException("kept statement in a transaction: $v");
                $pdo->commit();
                $once = null; // DEALLOCATE pdo_stmt_...
                $insert = null;
                $pdo->beginTransaction();
                $pdo->prepare("INSERT INTO $table (who, n) VALUES (?, ?)")->execute(["pdo$k", -$round]);
                $failed = step(fn () => $pdo->query('SELECT 1/0')->fetchColumn());
                $after = step(fn () => $pdo->query('SELECT 1')->fetchColumn());
                $pdo->rollBack();
                $states = [$failed['sqlstate'] ?? 'none', $after['sqlstate'] ?? 'none'];
                if ($states !== ['22012', '25P02']) throw new RuntimeException('error in a transaction: ' . implode(', ', $states));
                $count = $pdo->prepare("SELECT count(*) FROM $table WHERE who = ? AND n < 0");
                $count->execute(["pdo$k"]);
                if (($v = $count->fetchColumn()) != 0) throw new RuntimeException("rolled back rows seen: $v");
            } catch (Throwable $e) {
                if ($pdo->inTransaction()) step(fn () => $pdo->rollBack());
                $errors[] = "round $round client $k: " . sqlstateOf($e) . ' ' . strtok($e->getMessage(), "\n");
            }
        }
        $rounds++;
    }
    $kept = [];
    $clients = [];
    return ['errors' => $errors, 'rounds' => $rounds];
})();

// ATTR_PERSISTENT: a second PDO object with the same DSN gets the first one's
// connection back (within this process), with the session it left.
$result['pdoPersistent'] = (function () {
    $attrs = [PDO::ATTR_PERSISTENT => true];
    $first = pdo($attrs);
    $steps = [];
    $steps['set'] = step(fn () => $first->exec("SET application_name = 'drv_php_persistent'"));
    $statement = $first->prepare('SELECT ?::int + 1');
    $steps['first'] = step(function () use ($statement) { $statement->execute([1]); return $statement->fetchColumn(); });
    $statement = null;
    $first = null;
    $second = pdo($attrs);
    $steps['applicationName'] = step(fn () => $second->query('SHOW application_name')->fetchColumn());
    $steps['second'] = step(function () use ($second) { $s = $second->prepare('SELECT ?::int + 2'); $s->execute([1]); return $s->fetchColumn(); });
    $steps['inTransaction'] = step(function () use ($second) {
        $second->beginTransaction();
        $s = $second->prepare('SELECT ?::int + 3');
        $s->execute([1]);
        $v = $s->fetchColumn();
        $second->commit();
        return $v;
    });
    $steps['reset'] = step(fn () => $second->exec('RESET application_name'));
    return $steps;
})();

// COPY through PDO: pgsqlCopyFromArray, pgsqlCopyToArray, and a COPY that fails.
$result['pdoCopy'] = (function () use ($table) {
    $pdo = pdo();
    $table = "{$table}_copy"; // its own, so that what it reads does not depend on the scenarios before it
    $pdo->exec("CREATE TABLE $table (who text, n int)");
    $rows = [];
    for ($i = 1; $i <= 1000; $i++) $rows[] = "copy\t$i";
    $steps = [];
    $steps['in'] = step(fn () => $pdo->pgsqlCopyFromArray($table, $rows, "\t", '\\N', 'who, n'));
    $steps['out'] = step(function () use ($pdo, $table) {
        $out = $pdo->pgsqlCopyToArray($table, "\t", '\\N', 'n');
        return [count($out), array_sum(array_map('intval', $out)) - 0];
    });
    $steps['bad'] = step(fn () => $pdo->pgsqlCopyFromArray($table, ["copy\t1", "copy\tnot a number"], "\t", '\\N', 'who, n'));
    $steps['after'] = step(fn () => $pdo->query("SELECT count(*), sum(n) FROM $table WHERE who = 'copy'")->fetch());
    $steps['inTransaction'] = step(function () use ($pdo, $table) {
        $pdo->beginTransaction();
        $pdo->pgsqlCopyFromArray($table, ["copy\t5000"], "\t", '\\N', 'who, n');
        $n = $pdo->query("SELECT count(*) FROM $table WHERE who = 'copy'")->fetchColumn();
        $pdo->rollBack();
        return $n;
    });
    $pdo->exec("DROP TABLE $table");
    return $steps;
})();

// lastInsertId: SELECT CURRVAL($1) with the sequence's name, SELECT LASTVAL()
// without, each in a transaction of its own unless in the INSERT's.
function lastInsertIds(string $label, bool $inTransaction, array $names, ?string $sequence): array
{
    global $table;
    $clients = [];
    foreach ($names as $name) $clients[$name] = pdo();
    $counts = ['own' => 0, 'other' => 0, 'reads' => 0, 'refused' => [], 'errors' => []];
    $inserted = [];
    for ($round = 1; $round <= 4; $round++) {
        foreach ($clients as $name => $pdo) {
            if ($inTransaction) $pdo->beginTransaction();
            $r = step(function () use ($pdo, $table, $label, $name) {
                $s = $pdo->prepare("INSERT INTO $table (who) VALUES (?) RETURNING id");
                $s->execute(["$label-$name"]);
                return $s->fetchColumn();
            });
            if ($r['ok']) $inserted[$r['value']] = $name;
        }
        foreach (array_keys($clients) as $name) {
            $pdo = $clients[$name];
            $r = step(fn () => $pdo->lastInsertId($sequence));
            $counts['reads']++;
            if (!$r['ok']) {
                $list = str_contains($r['message'], 'currval() and lastval()') ? 'refused' : 'errors';
                $counts[$list][] = "{$r['sqlstate']} {$r['message']}";
                unset($clients[$name]); // a refusal closes the connection, as its FATAL says
                continue;
            }
            $counts[($inserted[$r['value']] ?? '') === $name ? 'own' : 'other']++;
            if ($inTransaction) $pdo->commit();
        }
    }
    return $counts;
}
$result['lastInsertIdAlone'] = lastInsertIds('alone', false, ['a'], $seq);
$result['lastInsertIdTurns'] = lastInsertIds('turns', false, ['a', 'b'], $seq);
$result['lastInsertIdLastval'] = lastInsertIds('lastval', false, ['a', 'b'], null);
$result['lastInsertIdInTransaction'] = lastInsertIds('block', true, ['a', 'b'], $seq);

// The pgsql extension: pg_prepare/pg_execute under one name by two connections
// taking turns, across transactions, DEALLOCATE and prepare again.
$result['pgPrepared'] = (function () {
    $clients = [pg(), pg()];
    $errors = [];
    foreach ($clients as $k => $c) {
        if (!pg_send_prepare($c, 'drv_php_stmt', 'SELECT $1::int * 100 + ' . $k)) $errors[] = "prepare $k";
        else step(fn () => pgResult($c));
    }
    for ($round = 1; $round <= 10; $round++) {
        foreach ($clients as $k => $c) {
            $r = step(function () use ($c, $k, $round) {
                $v = pgExecute($c, 'drv_php_stmt', [$round])[0][0];
                if ($v != $round * 100 + $k) throw new RuntimeException("execute: $v");
                pgQuery($c, 'BEGIN');
                $v = pgExecute($c, 'drv_php_stmt', [$round + 1])[0][0];
                if ($v != ($round + 1) * 100 + $k) throw new RuntimeException("in a transaction: $v");
                pgQuery($c, 'COMMIT');
                if ($round % 3 === 0) {
                    pgQuery($c, 'DEALLOCATE drv_php_stmt');
                    $gone = step(fn () => pgExecute($c, 'drv_php_stmt', [1]));
                    if (($gone['sqlstate'] ?? 'none') !== '26000') throw new RuntimeException('after DEALLOCATE: ' . json_encode($gone));
                    pg_send_prepare($c, 'drv_php_stmt', 'SELECT $1::int * 100 + ' . $k);
                    pgResult($c);
                }
                return true;
            });
            if (!$r['ok']) $errors[] = "round $round client $k: {$r['sqlstate']} {$r['message']}";
        }
    }
    foreach ($clients as $c) pg_close($c);
    return ['errors' => $errors];
})();

// pg_send_query + pg_cancel_query (PQrequestCancel, then the results are read and
// dropped), then the next query.
$result['pgCancel'] = (function () use ($table) {
    $c = pg();
    $steps = [];
    $sleep = "SELECT pg_sleep(5) /* $table */"; // its own text, to find it in pg_stat_activity
    pg_send_query($c, $sleep);
    usleep(200000);
    $started = microtime(true);
    $steps['cancelled'] = pg_cancel_query($c);
    $seconds = microtime(true) - $started;
    $steps['within2s'] = $seconds < 2;
    $steps['next'] = step(fn () => pgQuery($c, 'SELECT 42')[0][0]);
    $steps['stillRunning'] = step(fn () => pgQuery($c, "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", [$sleep])[0][0]);
    pg_close($c);
    return $steps + ['seconds' => round($seconds, 2)];
})();

// LISTEN/NOTIFY with pg_get_notify: another connection's notification, the
// listener's own (whose be_pid is pg_get_pid() direct), nothing after UNLISTEN.
$result['pgNotify'] = (function () {
    $listener = pg();
    $notifier = pg();
    $wait = function ($c, float $seconds) {
        $until = microtime(true) + $seconds;
        do {
            pg_consume_input($c);
            $n = pg_get_notify($c, PGSQL_ASSOC);
            if ($n !== false) return $n;
            usleep(20000);
        } while (microtime(true) < $until);
        return null;
    };
    $steps = [];
    $steps['listen'] = step(fn () => pgQuery($listener, 'LISTEN drv_php_channel'));
    $notifierPid = pgQuery($notifier, 'SELECT pg_backend_pid()')[0][0];
    pgQuery($notifier, "NOTIFY drv_php_channel, 'from the other'");
    $other = $wait($listener, 3);
    $steps['other'] = $other === null ? null : [$other['message'], $other['payload']];
    $steps['otherPidIsSender'] = $other !== null && (int) $other['pid'] === (int) $notifierPid;
    pgQuery($listener, "SELECT pg_notify('drv_php_channel', 'from itself')");
    $own = $wait($listener, 3);
    $steps['own'] = $own === null ? null : [$own['message'], $own['payload']];
    $steps['ownPidIsGetPid'] = $own !== null && (int) $own['pid'] === pg_get_pid($listener);
    pgQuery($listener, 'UNLISTEN drv_php_channel');
    pgQuery($notifier, "NOTIFY drv_php_channel, 'after unlisten'");
    $steps['afterUnlisten'] = $wait($listener, 1);
    pg_close($listener);
    pg_close($notifier);
    return $steps;
})();

$setup->exec("DROP TABLE IF EXISTS $table");
$setup = null;
echo json_encode($result), "\n";
