//! tokio-postgres-driver runs scenarios with tokio-postgres against the
//! target in its JSON argument and prints one JSON line: each step's result.
//! Each step has a "compare" part (what must be the same as direct: values,
//! SQLSTATEs, counts that do not depend on timing) and a "detail" part (sample
//! errors, timings) for the report. test/integration/tokio-postgres-driver.test.ts
//! runs it against PostgreSQL direct, PgBouncer and the sidecar in both modes.
//!
//! tokio-postgres prepares every `query` and `execute` under a name of its own
//! (`s0`, `s1`, ... counted per process), closes it when the statement is
//! dropped, and pipelines the requests of futures polled together: the steps
//! below run those paths with several clients taking turns on a small grant.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};
use futures_util::{pin_mut, SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::{Kind, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Error, GenericClient, NoTls, Notification, SimpleQueryMessage};

/// The run's configuration, from the JSON argument.
struct Cfg {
    /// The target.
    conn: String,
    /// PostgreSQL direct, superuser: to drop what the run created.
    admin: String,
    /// Makes table, type and channel names the target's own.
    suffix: String,
    /// Concurrent connections of the concurrent steps.
    clients: usize,
    /// Rounds per client in the concurrent steps.
    rounds: usize,
    /// Set in a child process of the `processes` step: its number.
    child: Option<usize>,
}

type Steps = Vec<(&'static str, fn(Arc<Cfg>) -> BoxFuture<'static, Value>)>;

fn main() {
    let arg: Value = std::env::args().nth(1).and_then(|a| serde_json::from_str(&a).ok()).unwrap_or_else(|| {
        eprintln!("usage: tokio-postgres-driver '<json config>'");
        std::process::exit(2)
    });
    let text = |k: &str| arg[k].as_str().unwrap_or_default().to_string();
    let number = |k: &str| arg[k].as_u64().unwrap_or(0) as usize;
    let cfg = Arc::new(Cfg {
        conn: text("conn"),
        admin: text("admin"),
        suffix: text("suffix"),
        clients: number("clients"),
        rounds: number("rounds"),
        child: arg["child"].as_u64().map(|c| c as usize),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    runtime.block_on(async move {
        if cfg.child.is_some() {
            println!("{}", child(cfg).await);
            return;
        }
        let steps: Steps = vec![
            ("setup", |c| Box::pin(setup(c))),
            ("queries", |c| Box::pin(queries(c))),
            ("processes", |c| Box::pin(processes(c))),
            ("prepared", |c| Box::pin(prepared(c))),
            ("pipeline", |c| Box::pin(pipeline(c))),
            ("pipelineError", |c| Box::pin(pipeline_error(c))),
            ("typeInfo", |c| Box::pin(type_info(c))),
            ("transactions", |c| Box::pin(transactions(c))),
            ("simpleQuery", |c| Box::pin(simple_query(c))),
            ("copy", |c| Box::pin(copy(c))),
            ("copyConcurrent", |c| Box::pin(copy_concurrent(c))),
            ("listenNotify", |c| Box::pin(listen_notify(c))),
            ("statementTimeout", |c| Box::pin(statement_timeout(c))),
            ("dropFuture", |c| Box::pin(drop_future(c))),
            ("cancel", |c| Box::pin(cancel(c))),
            ("cancelWhileQueued", |c| Box::pin(cancel_while_queued(c))),
        ];
        let mut out = BTreeMap::new();
        for (name, run) in steps {
            // "only": the steps to run (setup always), to look at one step alone.
            if name != "setup" && arg["only"].as_array().map_or(false, |only| !only.iter().any(|o| o == name)) {
                continue;
            }
            eprintln!("step {}", name);
            // A step that hangs is reported as such, and the next steps still run.
            let result = match tokio::time::timeout(Duration::from_secs(25), run(cfg.clone())).await {
                Ok(r) => r,
                Err(_) => json!({ "compare": { "hang": format!("{}: no result within 25 s", name) } }),
            };
            out.insert(name, result);
        }
        teardown(&cfg).await;
        println!("{}", serde_json::to_string(&out).expect("JSON"));
    });
}

/// A connection whose notifications land in `notes`.
struct Conn {
    client: Client,
    notes: mpsc::UnboundedReceiver<Notification>,
}

/// Connects and drives the connection on a task of its own, as an
/// application does, handing notifications over through poll_message.
async fn connect(conn: &str) -> Result<Conn, Error> {
    let (client, mut connection) = tokio_postgres::connect(conn, NoTls).await?;
    let (sender, notes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = sender.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("connection: {}", e);
                    break;
                }
            }
        }
    });
    Ok(Conn { client, notes })
}

/// A server error as its SQLSTATE, any other as its text.
fn error_of(e: &Error) -> Value {
    match e.code() {
        Some(code) => json!({ "sqlstate": code.code() }),
        None => json!({ "error": e.to_string() }),
    }
}

fn outcome<T: Into<Value>>(r: Result<T, Error>) -> Value {
    match r {
        Ok(v) => json!({ "value": v.into() }),
        Err(e) => error_of(&e),
    }
}

fn describe(e: &Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn table(cfg: &Cfg, name: &str) -> String {
    format!("tp_{}_{}", name, cfg.suffix)
}

/// Counts the failed and wrong queries of concurrent clients.
#[derive(Default)]
struct Tally {
    queries: usize,
    failed: usize,
    wrong: usize,
    errors: BTreeMap<String, usize>,
}

type SharedTally = Arc<Mutex<Tally>>;

fn add(t: &SharedTally, r: Result<bool, Error>) {
    let mut t = t.lock().unwrap();
    t.queries += 1;
    match r {
        Err(e) => {
            t.failed += 1;
            *t.errors.entry(describe(&e)).or_insert(0) += 1;
        }
        Ok(false) => t.wrong += 1,
        Ok(true) => {}
    }
}

fn tally_step(t: &SharedTally) -> Value {
    let t = t.lock().unwrap();
    json!({
        "compare": { "failed": t.failed, "wrong": t.wrong },
        "detail": { "queries": t.queries, "errors": t.errors },
    })
}

/// Runs body(i) for i in 0..n on tasks of their own, and waits for all.
async fn concurrently<F, Fut>(n: usize, body: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(body(i))).collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Runs body on cfg.clients connections at once and tallies their queries.
async fn with_clients<F, Fut>(cfg: &Arc<Cfg>, body: F) -> SharedTally
where
    F: Fn(Conn, usize, SharedTally) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let t: SharedTally = Arc::default();
    let body = Arc::new(body);
    concurrently(cfg.clients, |i| {
        let (cfg, t, body) = (cfg.clone(), t.clone(), body.clone());
        async move {
            match connect(&cfg.conn).await {
                Ok(c) => body(c, i, t).await,
                Err(e) => add(&t, Err(e)),
            }
        }
    })
    .await;
    t
}

async fn setup(cfg: Arc<Cfg>) -> Value {
    let c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let r = c
        .client
        .batch_execute(&format!(
            "CREATE TABLE {} (a int8, b text);
             CREATE TABLE {} (a int);
             CREATE TABLE {} (a int PRIMARY KEY);
             CREATE TYPE {} AS ENUM ('sad', 'ok', 'happy');",
            table(&cfg, "copy"),
            table(&cfg, "tx"),
            table(&cfg, "pipe"),
            table(&cfg, "mood")
        ))
        .await;
    json!({ "compare": outcome(r.map(|_| "created")) })
}

/// Drops what setup created, through PostgreSQL direct.
async fn teardown(cfg: &Cfg) {
    if let Ok(c) = connect(&cfg.admin).await {
        let names = ["copy", "tx", "pipe"].iter().map(|n| table(cfg, n)).collect::<Vec<_>>().join(", ");
        let sql = format!("DROP TABLE IF EXISTS {}; DROP TYPE IF EXISTS {}", names, table(cfg, "mood"));
        if let Err(e) = c.client.batch_execute(&sql).await {
            eprintln!("teardown: {}", e);
        }
    }
}

/// Three parameterised statements, each a text of its own (so each `query`
/// prepares, binds and closes a statement of its own), and an `execute`.
async fn three_queries<C: GenericClient>(c: &C, client_no: usize, base: i64, t: &SharedTally) {
    let label = client_no.to_string();
    for q in 0..3i64 {
        let text = format!("SELECT $1::int8 + {q}, $2::text || '-{q}'");
        let r = c.query_one(text.as_str(), &[&base, &label]).await.map(|row| {
            row.get::<_, i64>(0) == base + q && row.get::<_, String>(1) == format!("{}-{}", client_no, q)
        });
        add(t, r);
    }
    let r = c.execute("SELECT $1::int8 WHERE $1::int8 >= 0", &[&base]).await.map(|n| n == 1);
    add(t, r);
}

/// cfg.rounds rounds on one connection: every other round in a transaction,
/// the others each statement alone, so in transaction mode a client's
/// statements are prepared on one server connection and run on another.
async fn client_rounds(c: &mut Conn, client_no: usize, rounds: usize, t: &SharedTally) {
    for r in 0..rounds {
        let base = (client_no * 1000 + r) as i64;
        if r % 2 == 0 {
            match c.client.transaction().await {
                Ok(tx) => {
                    three_queries(&tx, client_no, base, t).await;
                    add(t, tx.commit().await.map(|_| true));
                }
                Err(e) => add(t, Err(e)),
            }
        } else {
            three_queries(&c.client, client_no, base, t).await;
        }
    }
}

/// cfg.clients connections run client_rounds at once.
async fn queries(cfg: Arc<Cfg>) -> Value {
    let rounds = cfg.rounds;
    let t = with_clients(&cfg, move |mut c, i, t| async move { client_rounds(&mut c, i, rounds, &t).await }).await;
    tally_step(&t)
}

const CHILD_PROCESSES: usize = 3;

/// A child process of the `processes` step: cfg.clients / 2 connections run
/// client_rounds and the prepared-statement rounds; prints its tally.
async fn child(cfg: Arc<Cfg>) -> Value {
    let t: SharedTally = Arc::default();
    let rounds = cfg.rounds;
    concurrently((cfg.clients / 2).max(1), |i| {
        let (cfg, t) = (cfg.clone(), t.clone());
        let client_no = cfg.child.unwrap_or(0) * 100 + i;
        async move {
            match connect(&cfg.conn).await {
                Ok(mut c) => {
                    client_rounds(&mut c, client_no, rounds, &t).await;
                    prepared_rounds(&mut c, client_no, rounds, &t).await;
                }
                Err(e) => add(&t, Err(e)),
            }
        }
    })
    .await;
    let t = t.lock().unwrap();
    json!({ "failed": t.failed, "wrong": t.wrong, "queries": t.queries, "errors": t.errors })
}

/// CHILD_PROCESSES processes at once, each with its own statement names
/// counted from `s0`: the names of one process's clients are another's.
async fn processes(cfg: Arc<Cfg>) -> Value {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return json!({ "compare": { "error": e.to_string() } }),
    };
    let children: Vec<_> = (0..CHILD_PROCESSES)
        .map(|n| {
            let config = json!({ "conn": cfg.conn, "clients": cfg.clients, "rounds": cfg.rounds, "child": n }).to_string();
            let exe = exe.clone();
            tokio::task::spawn_blocking(move || std::process::Command::new(exe).arg(config).output())
        })
        .collect();
    let (mut failed, mut wrong, mut queries) = (0, 0, 0);
    let mut errors = BTreeMap::<String, u64>::new();
    let mut broken = Vec::new();
    for child in children {
        let output = match child.await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                broken.push(e.to_string());
                continue;
            }
            Err(e) => {
                broken.push(e.to_string());
                continue;
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        match serde_json::from_str::<Value>(stdout.trim()) {
            Ok(r) => {
                failed += r["failed"].as_u64().unwrap_or(0);
                wrong += r["wrong"].as_u64().unwrap_or(0);
                queries += r["queries"].as_u64().unwrap_or(0);
                if let Some(map) = r["errors"].as_object() {
                    for (k, v) in map {
                        *errors.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
                    }
                }
            }
            Err(_) => broken.push(format!("{} {}", output.status, String::from_utf8_lossy(&output.stderr))),
        }
    }
    json!({
        "compare": { "failed": failed, "wrong": wrong, "brokenChildren": broken.len() },
        "detail": { "queries": queries, "errors": errors, "broken": broken },
    })
}

/// Explicit `prepare` once, the statement reused across transactions and
/// alone; every 4th round it is dropped (tokio-postgres sends a Close) and
/// prepared again; a `prepare_typed` statement alongside.
async fn prepared_rounds(c: &mut Conn, client_no: usize, rounds: usize, t: &SharedTally) {
    let text = "SELECT $1::int8 * 2, $2::text";
    let mut statement = match c.client.prepare(text).await {
        Ok(s) => s,
        Err(e) => return add(t, Err(e)),
    };
    let typed = match c.client.prepare_typed("SELECT $1 + 1", &[Type::INT8]).await {
        Ok(s) => s,
        Err(e) => return add(t, Err(e)),
    };
    let label = format!("client {}", client_no);
    for r in 0..rounds {
        let v = (client_no * 1000 + r) as i64;
        let check = |row: tokio_postgres::Row| row.get::<_, i64>(0) == 2 * v && row.get::<_, String>(1) == label;
        if r % 2 == 0 {
            match c.client.transaction().await {
                Ok(tx) => {
                    add(t, tx.query_one(&statement, &[&v, &label]).await.map(check));
                    add(t, tx.query_one(&typed, &[&v]).await.map(|row| row.get::<_, i64>(0) == v + 1));
                    add(t, tx.commit().await.map(|_| true));
                }
                Err(e) => add(t, Err(e)),
            }
        } else {
            add(t, c.client.query_one(&statement, &[&v, &label]).await.map(check));
            add(t, c.client.query_one(&typed, &[&v]).await.map(|row| row.get::<_, i64>(0) == v + 1));
        }
        if r % 4 == 3 {
            statement = match c.client.prepare(text).await {
                Ok(s) => s,
                Err(e) => return add(t, Err(e)),
            };
        }
    }
}

async fn prepared(cfg: Arc<Cfg>) -> Value {
    let rounds = cfg.rounds;
    let t = with_clients(&cfg, move |mut c, i, t| async move { prepared_rounds(&mut c, i, rounds, &t).await }).await;
    tally_step(&t)
}

/// join_all of 8 queries on one client, each its own text (8 Parse/Describe/
/// Sync in flight, then 8 Bind/Execute/Sync), then of 8 runs of one prepared
/// statement; every other round in a transaction.
async fn pipeline(cfg: Arc<Cfg>) -> Value {
    let rounds = cfg.rounds;
    let t = with_clients(&cfg, move |mut c, i, t| async move {
        let statement = match c.client.prepare("SELECT $1::int8 * 3").await {
            Ok(s) => s,
            Err(e) => return add(&t, Err(e)),
        };
        for r in 0..rounds {
            let v = (i * 1000 + r) as i64;
            let one_v: [&(dyn ToSql + Sync); 1] = [&v];
            let texts: Vec<String> = (0..8).map(|k| format!("SELECT $1::int8 * {}", k + 2)).collect();
            let check = |results: Vec<Result<tokio_postgres::Row, Error>>, t: &SharedTally, factor: &dyn Fn(i64) -> i64| {
                for (k, result) in results.into_iter().enumerate() {
                    add(t, result.map(|row| row.get::<_, i64>(0) == factor(k as i64)));
                }
            };
            if r % 2 == 0 {
                let tx = match c.client.transaction().await {
                    Ok(tx) => tx,
                    Err(e) => {
                        add(&t, Err(e));
                        continue;
                    }
                };
                let results = join_all(texts.iter().map(|text| tx.query_one(text.as_str(), &one_v))).await;
                check(results, &t, &|k| v * (k + 2));
                let ks: Vec<i64> = (0..8).map(|k| v + k).collect();
                let results = join_all(params(&ks).iter().map(|p| tx.query_one(&statement, p))).await;
                check(results, &t, &|k| 3 * (v + k));
                add(&t, tx.commit().await.map(|_| true));
            } else {
                let results = join_all(texts.iter().map(|text| c.client.query_one(text.as_str(), &one_v))).await;
                check(results, &t, &|k| v * (k + 2));
                let ks: Vec<i64> = (0..8).map(|k| v + k).collect();
                let results = join_all(params(&ks).iter().map(|p| c.client.query_one(&statement, p))).await;
                check(results, &t, &|k| 3 * (v + k));
            }
        }
    })
    .await;
    tally_step(&t)
}

/// One parameter list per value, for futures that outlive a closure's temporaries.
fn params<T: ToSql + Sync>(values: &[T]) -> Vec<[&(dyn ToSql + Sync); 1]> {
    values.iter().map(|v| [v as &(dyn ToSql + Sync)]).collect()
}

fn outcomes(results: Vec<Result<tokio_postgres::Row, Error>>) -> Value {
    Value::Array(results.into_iter().map(|r| outcome(r.map(|row| row.get::<_, i32>(0)))).collect())
}

/// A server error in the middle of a pipeline: 10 / $1 with $1 = 0 third of
/// five, through one prepared statement and through five texts; the same in
/// a transaction (the rest 25P02, then COMMIT rolls back); a syntax error
/// among pipelined prepares; a duplicate key among pipelined inserts.
async fn pipeline_error(cfg: Arc<Cfg>) -> Value {
    let c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let mut c = c;
    let divisors: Vec<i32> = vec![1, 2, 0, 5, 1];
    let mut compare = serde_json::Map::new();
    let statement = match c.client.prepare("SELECT 10 / $1::int4").await {
        Ok(s) => s,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let results = join_all(params(&divisors).iter().map(|p| c.client.query_one(&statement, p))).await;
    compare.insert("prepared".into(), outcomes(results));
    let texts: Vec<String> = (0..5).map(|k| format!("SELECT {} / $1::int4", 10 * (k + 1))).collect();
    let results = join_all(texts.iter().zip(params(&divisors).iter()).map(|(text, p)| c.client.query_one(text.as_str(), p))).await;
    compare.insert("texts".into(), outcomes(results));
    let bad = ["SELECT 1::int4", "SELECT 2::int4", "SELEC 3", "SELECT 4::int4"];
    let results = join_all(bad.iter().map(|text| c.client.query_one(*text, &[]))).await;
    compare.insert("syntaxError".into(), outcomes(results));
    match c.client.transaction().await {
        Ok(tx) => {
            let results = join_all(params(&divisors).iter().map(|p| tx.query_one(&statement, p))).await;
            compare.insert("inTransaction".into(), outcomes(results));
            compare.insert("commit".into(), outcome(tx.commit().await.map(|_| "committed")));
        }
        Err(e) => {
            compare.insert("inTransaction".into(), error_of(&e));
        }
    }
    let pipe = table(&cfg, "pipe");
    let insert = format!("INSERT INTO {} VALUES ($1)", pipe);
    let keys: Vec<i32> = vec![1, 2, 2, 3];
    let results = join_all(params(&keys).iter().map(|p| c.client.execute(insert.as_str(), p))).await;
    compare.insert(
        "duplicateKey".into(),
        Value::Array(results.into_iter().map(|r| outcome(r.map(|n| n as i64))).collect()),
    );
    let rows = c.client.query_one(format!("SELECT count(*)::int4 FROM {}", pipe).as_str(), &[]).await;
    compare.insert("rowsAfter".into(), outcome(rows.map(|r| r.get::<_, i32>(0))));
    compare.insert("after".into(), outcome(c.client.query_one("SELECT 42::int4", &[]).await.map(|r| r.get::<_, i32>(0))));
    json!({ "compare": compare })
}

/// A user-defined enum in a result: tokio-postgres looks its type up with
/// statements it prepares once per connection and keeps for the next
/// lookups; cfg.clients connections at once, in and out of transactions.
async fn type_info(cfg: Arc<Cfg>) -> Value {
    let mood = table(&cfg, "mood");
    let t = with_clients(&cfg, move |mut c, i, t| {
        let mood = mood.clone();
        async move {
            for r in 0..4 {
                // Each round a text of its own: each is prepared, and its types looked up.
                let text = format!("SELECT 'ok'::{m}, ARRAY['sad', 'happy']::{m}[], {n}::int4", m = mood, n = i * 10 + r);
                let check = |s: tokio_postgres::Statement| {
                    let columns = s.columns();
                    let enum_ok = matches!(columns[0].type_().kind(), Kind::Enum(v) if v.len() == 3) && columns[0].type_().name() == mood;
                    let array_ok = matches!(columns[1].type_().kind(), Kind::Array(e) if e.name() == mood);
                    enum_ok && array_ok
                };
                if r % 2 == 0 {
                    match c.client.transaction().await {
                        Ok(tx) => {
                            add(&t, tx.prepare(&text).await.map(check));
                            add(&t, tx.commit().await.map(|_| true));
                        }
                        Err(e) => add(&t, Err(e)),
                    }
                } else {
                    add(&t, c.client.prepare(&text).await.map(check));
                }
            }
        }
    })
    .await;
    tally_step(&t)
}

fn rows_of(r: Result<Vec<tokio_postgres::Row>, Error>) -> Value {
    outcome(r.map(|rows| rows.iter().map(|row| row.get::<_, i32>(0)).collect::<Vec<_>>()))
}

/// `transaction()` with savepoints (`transaction.transaction()` and a named
/// `savepoint`), an error in one and its rollback; a portal read 10 rows at a
/// time; a transaction dropped without commit (tokio-postgres sends ROLLBACK);
/// an error without a savepoint, then COMMIT.
async fn transactions(cfg: Arc<Cfg>) -> Value {
    let mut c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let tx_table = table(&cfg, "tx");
    let insert = format!("INSERT INTO {} VALUES ($1)", tx_table);
    let select = format!("SELECT a FROM {} ORDER BY a", tx_table);
    let mut compare = serde_json::Map::new();
    let r: Result<(), Error> = async {
        let mut tx = c.client.transaction().await?;
        tx.execute(insert.as_str(), &[&1i32]).await?;
        {
            let sp = tx.transaction().await?;
            sp.execute(insert.as_str(), &[&2i32]).await?;
            compare.insert("inSavepoint".into(), outcome(sp.query_one("SELECT 1 / 0", &[]).await.map(|_| "no error")));
            compare.insert("afterError".into(), outcome(sp.query_one("SELECT 1", &[]).await.map(|_| "no error")));
            compare.insert("rollbackToSavepoint".into(), outcome(sp.rollback().await.map(|_| "rolled back")));
        }
        tx.execute(insert.as_str(), &[&3i32]).await?;
        {
            let sp = tx.savepoint("named").await?;
            sp.execute(insert.as_str(), &[&4i32]).await?;
            compare.insert("release".into(), outcome(sp.commit().await.map(|_| "released")));
        }
        let series = tx.prepare("SELECT generate_series(1, 25)::int4").await?;
        let portal = tx.bind(&series, &[]).await?;
        let mut sizes = Vec::new();
        for _ in 0..4 {
            sizes.push(tx.query_portal(&portal, 10).await?.len());
        }
        compare.insert("portalReads".into(), json!(sizes));
        tx.commit().await
    }
    .await;
    compare.insert("first".into(), outcome(r.map(|_| "committed")));
    compare.insert("rows".into(), rows_of(c.client.query(select.as_str(), &[]).await));
    {
        let dropped = async {
            let tx = c.client.transaction().await?;
            tx.execute(insert.as_str(), &[&5i32]).await
        };
        compare.insert("droppedInsert".into(), outcome(dropped.await.map(|n| n as i64)));
    }
    compare.insert("rowsAfterDrop".into(), rows_of(c.client.query(select.as_str(), &[]).await));
    let r: Result<(), Error> = async {
        let tx = c.client.transaction().await?;
        tx.execute(insert.as_str(), &[&6i32]).await?;
        compare.insert("error".into(), outcome(tx.query_one("SELECT 1 / 0", &[]).await.map(|_| "no error")));
        tx.commit().await
    }
    .await;
    compare.insert("commitAfterError".into(), outcome(r.map(|_| "no error")));
    compare.insert("rowsAfterError".into(), rows_of(c.client.query(select.as_str(), &[]).await));
    json!({ "compare": compare })
}

fn simple_rows(r: Result<Vec<SimpleQueryMessage>, Error>) -> Value {
    outcome(r.map(|messages| {
        messages
            .iter()
            .map(|m| match m {
                SimpleQueryMessage::Row(row) => json!((0..row.len()).map(|i| row.get(i)).collect::<Vec<_>>()),
                SimpleQueryMessage::CommandComplete(n) => json!(format!("complete {}", n)),
                _ => json!("other"),
            })
            .collect::<Vec<_>>()
    }))
}

/// `simple_query` of several statements, one failing in the middle;
/// `batch_execute` of a transaction; a `SET` sent with `batch_execute`, then
/// read back in later statements (in transaction mode, on other server
/// connections); BEGIN and COMMIT as SQL around an extended-protocol query.
async fn simple_query(cfg: Arc<Cfg>) -> Value {
    let c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let tx_table = table(&cfg, "tx");
    let mut compare = serde_json::Map::new();
    compare.insert("twoStatements".into(), simple_rows(c.client.simple_query("SELECT 1 AS a, 'x' AS b; SELECT 2 AS c").await));
    compare.insert("errorInMiddle".into(), simple_rows(c.client.simple_query("SELECT 1; SELECT 1 / 0; SELECT 3").await));
    compare.insert("afterError".into(), simple_rows(c.client.simple_query("SELECT 4").await));
    let batch = format!("BEGIN; INSERT INTO {t} VALUES (10); INSERT INTO {t} VALUES (11); COMMIT", t = tx_table);
    compare.insert("batchTransaction".into(), outcome(c.client.batch_execute(&batch).await.map(|_| "done")));
    compare.insert("set".into(), outcome(c.client.batch_execute("SET application_name = 'tokio_pg_app'").await.map(|_| "done")));
    let mut shown = Vec::new();
    for _ in 0..3 {
        shown.push(outcome(c.client.query_one("SHOW application_name", &[]).await.map(|r| r.get::<_, String>(0))));
        shown.push(simple_rows(c.client.simple_query("SHOW application_name").await));
    }
    compare.insert("shown".into(), json!(shown));
    let r: Result<i64, Error> = async {
        c.client.batch_execute("BEGIN").await?;
        let n = c.client.query_one(format!("SELECT count(*) FROM {}", tx_table).as_str(), &[]).await?.get::<_, i64>(0);
        c.client.batch_execute("COMMIT").await?;
        Ok(n)
    }
    .await;
    compare.insert("sqlTransaction".into(), outcome(r));
    json!({ "compare": compare })
}

const COPY_ROWS: i64 = 10_000;

/// `copy_in` and `copy_out`, text and binary; a text copy with a bad row; a
/// copy sink dropped unfinished (tokio-postgres sends CopyFail); a copy in a
/// transaction rolled back.
async fn copy(cfg: Arc<Cfg>) -> Value {
    let c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let mut c = c;
    let copy_table = table(&cfg, "copy");
    let copy_in = format!("COPY {} (a, b) FROM STDIN", copy_table);
    let copy_in_binary = format!("COPY {} (a, b) FROM STDIN (FORMAT binary)", copy_table);
    let count = format!("SELECT count(*), coalesce(sum(a), 0)::int8 FROM {}", copy_table);
    let mut compare = serde_json::Map::new();
    let text_rows = |from: i64, bad_at: Option<i64>| -> Vec<Bytes> {
        (0..10)
            .map(|chunk| {
                let mut s = String::new();
                for i in from + chunk * 1000..from + (chunk + 1) * 1000 {
                    if Some(i) == bad_at {
                        s.push_str("x\tbad\n");
                    } else {
                        s.push_str(&format!("{}\trow {}\n", i, i));
                    }
                }
                Bytes::from(s)
            })
            .collect()
    };
    let r: Result<u64, Error> = async {
        let sink = c.client.copy_in(copy_in.as_str()).await?;
        pin_mut!(sink);
        for chunk in text_rows(0, None) {
            sink.send(chunk).await?;
        }
        sink.finish().await
    }
    .await;
    compare.insert("textIn".into(), outcome(r.map(|n| n as i64)));
    let r: Result<(usize, i64), Error> = async {
        let stream = c.client.copy_out(format!("COPY (SELECT a, b FROM {} ORDER BY a) TO STDOUT", copy_table).as_str()).await?;
        pin_mut!(stream);
        let (mut lines, mut sum) = (0usize, 0i64);
        let mut rest = Vec::new();
        while let Some(chunk) = stream.next().await {
            rest.extend_from_slice(&chunk?);
        }
        for line in String::from_utf8_lossy(&rest).lines() {
            lines += 1;
            sum += line.split('\t').next().and_then(|a| a.parse::<i64>().ok()).unwrap_or(0);
        }
        Ok((lines, sum))
    }
    .await;
    compare.insert("textOut".into(), outcome(r.map(|(l, s)| json!([l, s]))));
    let r: Result<u64, Error> = async {
        let sink = c.client.copy_in(copy_in_binary.as_str()).await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT]);
        pin_mut!(writer);
        for i in COPY_ROWS..2 * COPY_ROWS {
            let b = format!("binary {}", i);
            writer.as_mut().write(&[&i, &b]).await?;
        }
        writer.finish().await
    }
    .await;
    compare.insert("binaryIn".into(), outcome(r.map(|n| n as i64)));
    let r: Result<(usize, i64), Error> = async {
        let stream = c.client.copy_out(format!("COPY (SELECT a, b FROM {} ORDER BY a) TO STDOUT (FORMAT binary)", copy_table).as_str()).await?;
        let rows = BinaryCopyOutStream::new(stream, &[Type::INT8, Type::TEXT]);
        pin_mut!(rows);
        let (mut n, mut sum) = (0usize, 0i64);
        while let Some(row) = rows.next().await {
            let row = row?;
            n += 1;
            sum += row.get::<i64>(0);
        }
        Ok((n, sum))
    }
    .await;
    compare.insert("binaryOut".into(), outcome(r.map(|(l, s)| json!([l, s]))));
    let r: Result<u64, Error> = async {
        let sink = c.client.copy_in(copy_in.as_str()).await?;
        pin_mut!(sink);
        for chunk in text_rows(3 * COPY_ROWS, Some(3 * COPY_ROWS + 5000)) {
            sink.send(chunk).await?;
        }
        sink.finish().await
    }
    .await;
    compare.insert("badRow".into(), outcome(r.map(|n| n as i64)));
    let counted = |r: Result<tokio_postgres::Row, Error>| outcome(r.map(|row| json!([row.get::<_, i64>(0), row.get::<_, i64>(1)])));
    compare.insert("countAfterBadRow".into(), counted(c.client.query_one(count.as_str(), &[]).await));
    {
        let r: Result<(), Error> = async {
            let sink = c.client.copy_in::<_, Bytes>(copy_in.as_str()).await?;
            pin_mut!(sink);
            sink.send(Bytes::from_static(b"777\tunfinished\n")).await?;
            Ok(())
        }
        .await;
        compare.insert("dropped".into(), outcome(r.map(|_| "sent")));
    }
    compare.insert("countAfterDrop".into(), counted(c.client.query_one(count.as_str(), &[]).await));
    let r: Result<Value, Error> = async {
        let tx = c.client.transaction().await?;
        let sink = tx.copy_in(copy_in.as_str()).await?;
        pin_mut!(sink);
        sink.send(Bytes::from_static(b"1\tin transaction\n2\tin transaction\n")).await?;
        let n = sink.finish().await?;
        let inside = tx.query_one(count.as_str(), &[]).await?.get::<_, i64>(0);
        tx.rollback().await?;
        Ok(json!([n, inside]))
    }
    .await;
    compare.insert("inTransaction".into(), outcome(r));
    compare.insert("countAfterRollback".into(), counted(c.client.query_one(count.as_str(), &[]).await));
    json!({ "compare": compare })
}

/// cfg.clients connections binary-copy 2,000 rows each at once.
async fn copy_concurrent(cfg: Arc<Cfg>) -> Value {
    let copy_in = format!("COPY {} (a, b) FROM STDIN (FORMAT binary)", table(&cfg, "copy"));
    let t = with_clients(&cfg, move |c, i, t| {
        let copy_in = copy_in.clone();
        async move {
            let r: Result<u64, Error> = async {
                let sink = c.client.copy_in(copy_in.as_str()).await?;
                let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT]);
                pin_mut!(writer);
                for k in 0..2000i64 {
                    let a = 1_000_000 + (i as i64) * 10_000 + k;
                    writer.as_mut().write(&[&a, &"concurrent"]).await?;
                }
                writer.finish().await
            }
            .await;
            add(&t, r.map(|n| n == 2000));
        }
    })
    .await;
    let total = match connect(&cfg.conn).await {
        Ok(c) => outcome(
            c.client
                .query_one(format!("SELECT count(*) FROM {} WHERE a >= 1000000", table(&cfg, "copy")).as_str(), &[])
                .await
                .map(|r| r.get::<_, i64>(0)),
        ),
        Err(e) => error_of(&e),
    };
    let mut step = tally_step(&t);
    step["compare"]["rows"] = total;
    step
}

async fn wait_notification(c: &mut Conn, seconds: u64) -> (Value, Option<Notification>) {
    match tokio::time::timeout(Duration::from_secs(seconds), c.notes.recv()).await {
        Ok(Some(n)) => (json!({ "value": n.payload() }), Some(n)),
        Ok(None) => (json!({ "error": "connection closed" }), None),
        Err(_) => (json!({ "error": "no notification in time" }), None),
    }
}

/// LISTEN (batch_execute: a simple Query) on one connection, pg_notify from
/// another and from the listener itself, received through poll_message;
/// UNLISTEN, then a notification that must not come. The sender pid is
/// compared with pg_backend_pid() of the statement that notified.
async fn listen_notify(cfg: Arc<Cfg>) -> Value {
    let (mut listener, notifier) = match (connect(&cfg.conn).await, connect(&cfg.conn).await) {
        (Ok(l), Ok(n)) => (l, n),
        (Err(e), _) | (_, Err(e)) => return json!({ "compare": error_of(&e) }),
    };
    let channel = format!("tp_{}", cfg.suffix);
    let notify = "SELECT pg_backend_pid(), pg_notify($1, $2)";
    let listen = outcome(listener.client.batch_execute(&format!("LISTEN {}", channel)).await.map(|_| "LISTEN"));
    let other_pid = notifier.client.query_one(notify, &[&channel, &"from another"]).await.map(|r| r.get::<_, i32>(0));
    let (from_other, n1) = wait_notification(&mut listener, 3).await;
    let own_pid = listener.client.query_one(notify, &[&channel, &"from itself"]).await.map(|r| r.get::<_, i32>(0));
    let (from_self, n2) = wait_notification(&mut listener, 3).await;
    let unlisten = outcome(listener.client.batch_execute(&format!("UNLISTEN {}", channel)).await.map(|_| "UNLISTEN"));
    let _ = notifier.client.query_one(notify, &[&channel, &"after unlisten"]).await;
    let (after_unlisten, _) = wait_notification(&mut listener, 1).await; // the others arrive at once: 1 s shows none comes
    let mut pids = serde_json::Map::new();
    if let (Some(n), Ok(pid)) = (&n1, &other_pid) {
        pids.insert("otherSenderIsNotifierPid".into(), json!(n.process_id() == *pid));
    }
    if let (Some(n), Ok(pid)) = (&n2, &own_pid) {
        pids.insert("ownSenderIsOwnPid".into(), json!(n.process_id() == *pid));
    }
    json!({ "compare": {
        "listen": listen, "notify": outcome(other_pid.map(|_| "notified")), "fromOther": from_other,
        "notifySelf": outcome(own_pid.map(|_| "notified")), "fromSelf": from_self,
        "unlisten": unlisten, "afterUnlisten": after_unlisten, "pids": pids,
    } })
}

fn sleep_outcome(r: Result<Vec<tokio_postgres::Row>, Error>) -> Value {
    outcome(r.map(|_| "slept"))
}

/// statement_timeout set by `SET` (batch_execute), by `SET LOCAL` in a
/// transaction, and by the startup `options`.
async fn statement_timeout(cfg: Arc<Cfg>) -> Value {
    let mut c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let mut compare = serde_json::Map::new();
    compare.insert("set".into(), outcome(c.client.batch_execute("SET statement_timeout = '200ms'").await.map(|_| "done")));
    let mut sleeps = Vec::new();
    for _ in 0..3 {
        sleeps.push(sleep_outcome(c.client.query("SELECT pg_sleep(1)", &[]).await));
    }
    compare.insert("sleeps".into(), json!(sleeps));
    compare.insert("show".into(), outcome(c.client.query_one("SHOW statement_timeout", &[]).await.map(|r| r.get::<_, String>(0))));
    compare.insert("reset".into(), outcome(c.client.batch_execute("RESET statement_timeout").await.map(|_| "done")));
    compare.insert("afterReset".into(), sleep_outcome(c.client.query("SELECT pg_sleep(0.3)", &[]).await));
    let r: Result<Value, Error> = async {
        let tx = c.client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = 200").await?;
        let slept = sleep_outcome(tx.query("SELECT pg_sleep(1)", &[]).await);
        tx.rollback().await?;
        Ok(slept)
    }
    .await;
    compare.insert("setLocal".into(), outcome(r));
    compare.insert("afterSetLocal".into(), sleep_outcome(c.client.query("SELECT pg_sleep(0.3)", &[]).await));
    let with_options = format!("{} options='-c statement_timeout=200'", cfg.conn);
    let startup = match connect(&with_options).await {
        Ok(o) => sleep_outcome(o.client.query("SELECT pg_sleep(1)", &[]).await),
        Err(e) => error_of(&e),
    };
    compare.insert("startupOptions".into(), startup);
    json!({ "compare": compare })
}

/// Futures dropped mid-query: a query given up after 200 ms (its answer is
/// still read and thrown away by the connection), in and out of a
/// transaction; a row stream dropped after 10 rows; a future never polled;
/// cfg.clients connections each giving up a query, then running the next.
async fn drop_future(cfg: Arc<Cfg>) -> Value {
    let mut c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let forty_two = |r: Result<tokio_postgres::Row, Error>| outcome(r.map(|row| row.get::<_, i32>(0)));
    let mut compare = serde_json::Map::new();
    let given_up = tokio::time::timeout(Duration::from_millis(200), c.client.query("SELECT pg_sleep(1)", &[])).await;
    compare.insert("timedOut".into(), json!(given_up.is_err()));
    compare.insert("next".into(), forty_two(c.client.query_one("SELECT 42::int4", &[]).await));
    let r: Result<usize, Error> = async {
        let rows = c.client.query_raw("SELECT generate_series(1, 200000)::int4", std::iter::empty::<i32>()).await?;
        pin_mut!(rows);
        let mut n = 0;
        while let Some(row) = rows.next().await {
            row?;
            n += 1;
            if n == 10 {
                break;
            }
        }
        Ok(n)
    }
    .await;
    compare.insert("streamDropped".into(), outcome(r.map(|n| n as i64)));
    compare.insert("afterStream".into(), forty_two(c.client.query_one("SELECT 43::int4 - 1", &[]).await));
    drop(c.client.query("SELECT pg_sleep(5)", &[]));
    compare.insert("afterUnpolled".into(), forty_two(c.client.query_one("SELECT 44::int4 - 2", &[]).await));
    let r: Result<Value, Error> = async {
        let tx = c.client.transaction().await?;
        let given_up = tokio::time::timeout(Duration::from_millis(200), tx.query("SELECT pg_sleep(1)", &[])).await;
        let next = tx.query_one("SELECT 45::int4 - 3", &[]).await?.get::<_, i32>(0);
        tx.commit().await?;
        Ok(json!([given_up.is_err(), next]))
    }
    .await;
    compare.insert("inTransaction".into(), outcome(r));
    let t = with_clients(&cfg, |c, i, t| async move {
        for r in 0..3 {
            let _ = tokio::time::timeout(Duration::from_millis(50), c.client.query("SELECT pg_sleep(0.2)", &[])).await;
            let v = (i * 10 + r) as i64;
            add(&t, c.client.query_one("SELECT $1::int8 + 1", &[&v]).await.map(|row| row.get::<_, i64>(0) == v + 1));
        }
    })
    .await;
    let tally = tally_step(&t);
    compare.insert("clients".into(), tally["compare"].clone());
    json!({ "compare": compare, "detail": { "clients": tally["detail"] } })
}

/// `cancel_token().cancel_query(NoTls)` 300 ms into `pg_sleep(5)`, alone and
/// in a transaction; then the next statement.
async fn cancel(cfg: Arc<Cfg>) -> Value {
    let mut c = match connect(&cfg.conn).await {
        Ok(c) => c,
        Err(e) => return json!({ "compare": error_of(&e) }),
    };
    let token = c.client.cancel_token();
    let cancel_later = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    };
    let started = Instant::now();
    let (slept, sent) = tokio::join!(c.client.query("SELECT pg_sleep(5)", &[]), cancel_later());
    let elapsed = started.elapsed().as_secs_f64();
    let mut compare = serde_json::Map::new();
    compare.insert("sleep".into(), sleep_outcome(slept));
    compare.insert("cancelSent".into(), outcome(sent.map(|_| "sent")));
    compare.insert("within2s".into(), json!(elapsed < 2.0));
    compare.insert("next".into(), outcome(c.client.query_one("SELECT 42::int4", &[]).await.map(|r| r.get::<_, i32>(0))));
    let token = c.client.cancel_token();
    let r: Result<Value, Error> = async {
        let tx = c.client.transaction().await?;
        let (slept, _) = tokio::join!(tx.query("SELECT pg_sleep(5)", &[]), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let after = outcome(tx.query_one("SELECT 1", &[]).await.map(|_| "no error"));
        tx.rollback().await?;
        Ok(json!([sleep_outcome(slept), after]))
    }
    .await;
    compare.insert("inTransaction".into(), outcome(r));
    compare.insert("afterTransaction".into(), outcome(c.client.query_one("SELECT 42::int4", &[]).await.map(|r| r.get::<_, i32>(0))));
    json!({ "compare": compare, "detail": { "seconds": elapsed } })
}

/// 2 connections hold `pg_sleep(1.5)` (in transaction mode the whole grant),
/// a third is cancelled 300 ms into `pg_sleep(5)`: its answer, how soon, and
/// its next statement.
async fn cancel_while_queued(cfg: Arc<Cfg>) -> Value {
    let (h1, h2, c) = match (connect(&cfg.conn).await, connect(&cfg.conn).await, connect(&cfg.conn).await) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return json!({ "compare": error_of(&e) }),
    };
    let token = c.client.cancel_token();
    async fn hold(h: &Conn) -> Value {
        sleep_outcome(h.client.query("SELECT pg_sleep(1.5)", &[]).await)
    }
    let started = Instant::now();
    let (held1, held2, (slept, seconds)) = tokio::join!(hold(&h1), hold(&h2), async {
        tokio::time::sleep(Duration::from_millis(100)).await; // the holders first
        let (slept, _) = tokio::join!(c.client.query("SELECT pg_sleep(5)", &[]), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        (slept, started.elapsed().as_secs_f64())
    });
    json!({
        "compare": {
            "holders": [held1, held2],
            "sleep": sleep_outcome(slept),
            "within1s": seconds < 1.0,
            "next": outcome(c.client.query_one("SELECT 42::int4", &[]).await.map(|r| r.get::<_, i32>(0))),
        },
        "detail": { "seconds": seconds },
    })
}
