// pgx-driver runs scenarios with pgx v5 against the target in its JSON
// argument and prints one JSON line: each step's result. Each step has a
// "compare" part (what must be the same as direct: values, SQLSTATEs,
// counts that do not depend on timing) and a "detail" part (sample errors,
// timings) for the report. test/integration/pgx-driver.test.ts runs it
// against PostgreSQL direct, PgBouncer and the sidecar in both modes.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"
)

type config struct {
	Conn    string `json:"conn"`    // the target
	Admin   string `json:"admin"`   // PostgreSQL direct, superuser: to look at the server
	Suffix  string `json:"suffix"`  // makes table and channel names the target's own
	Mode    string `json:"mode"`    // direct, transaction or session
	Clients int    `json:"clients"` // concurrent connections of the concurrent steps
	Rounds  int    `json:"rounds"`  // transactions per client in the concurrent steps
}

type step struct {
	Compare any `json:"compare"`
	Detail  any `json:"detail,omitempty"`
}

var cfg config

func main() {
	if err := json.Unmarshal([]byte(os.Args[1]), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	out := map[string]step{}
	steps := []struct {
		name string
		run  func(context.Context) step
	}{
		{"setup", setup},
		{"execModes", execModes},
		{"pool", pool},
		{"cacheEviction", cacheEviction},
		{"batchEviction", batchEviction},
		{"explicitPrepare", explicitPrepare},
		{"copyConcurrent", copyConcurrent},
		{"schemaChange", schemaChange},
		{"discardAll", discardAll},
		{"batch", batch},
		{"copyFrom", copyFrom},
		{"listenNotify", listenNotify},
		{"backendPid", backendPid},
		{"savepoint", savepoint},
		{"copyFail", copyFail},
		{"largeStatement", largeStatement},
		// Last: PgBouncer 1.18 can exit at a cancel connection closed early (FATAL "bad client state").
		{"cancelTimeout", cancelTimeout},
		{"cancelWhileQueued", cancelWhileQueued},
	}
	for _, s := range steps {
		fmt.Fprintf(os.Stderr, "%s step %s\n", time.Now().Format("15:04:05.000"), s.name)
		// A step that hangs is reported as such, and the next steps still run.
		ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
		out[s.name] = s.run(ctx)
		if ctx.Err() != nil {
			out[s.name] = step{Compare: map[string]any{"hang": s.name + ": no result within 25 s"}, Detail: out[s.name]}
		}
		cancel()
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

// outcome is a value or an error as compared across targets: the SQLSTATE of
// a server error, the text of any other.
type outcome struct {
	Value    any    `json:"value,omitempty"`
	SQLState string `json:"sqlstate,omitempty"`
	Error    string `json:"error,omitempty"`
}

func errorOf(err error) outcome {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return outcome{SQLState: pgErr.Code}
	}
	return outcome{Error: err.Error()}
}

func result(v any, err error) outcome {
	if err != nil {
		return errorOf(err)
	}
	return outcome{Value: v}
}

func describe(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code + " " + pgErr.Message
	}
	return err.Error()
}

func connect(ctx context.Context, conn string, tune func(*pgx.ConnConfig)) (*pgx.Conn, error) {
	c, err := pgx.ParseConfig(conn)
	if err != nil {
		return nil, err
	}
	if tune != nil {
		tune(c)
	}
	return pgx.ConnectConfig(ctx, c)
}

func table(name string) string { return "pgx_" + name + "_" + cfg.Suffix }

func setup(ctx context.Context) step {
	c, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer c.Close(context.Background())
	_, err = c.Exec(ctx, fmt.Sprintf(`
		CREATE TABLE %s (a int8, b text);
		CREATE TABLE %s (a int);
		INSERT INTO %s VALUES (1);
		CREATE TABLE %s (a int);
		CREATE TABLE %s (a int PRIMARY KEY);`,
		table("copy"), table("shape"), table("shape"), table("savepoint"), table("batch")))
	return step{Compare: result("created", err)}
}

// tally counts the failed and wrong queries of concurrent clients.
type tally struct {
	mu      sync.Mutex
	queries int
	failed  int
	wrong   int
	errors  map[string]int
}

func (t *tally) add(err error, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.queries++
	switch {
	case err != nil:
		t.failed++
		if t.errors == nil {
			t.errors = map[string]int{}
		}
		t.errors[describe(err)]++
	case !ok:
		t.wrong++
	}
}

func (t *tally) compare() map[string]int { return map[string]int{"failed": t.failed, "wrong": t.wrong} }

func (t *tally) detail() map[string]any {
	return map[string]any{"queries": t.queries, "errors": t.errors}
}

// clientRounds runs cfg.Rounds rounds of queries on one connection: every
// other round in a transaction of its own, the others each query alone, so
// in transaction mode a client's statements land on one server connection
// and run again on another.
func clientRounds(ctx context.Context, c *pgx.Conn, client int, queries int, t *tally) {
	for r := 0; r < cfg.Rounds; r++ {
		var tx pgx.Tx
		var err error
		if r%2 == 0 {
			if tx, err = c.Begin(ctx); err != nil {
				t.add(err, false)
				continue
			}
		}
		for q := 0; q < queries; q++ {
			// Each text is its own statement; the parameters change every round.
			var sum int64
			var text string
			err := c.QueryRow(ctx, fmt.Sprintf("SELECT $1::int8 + %d, $2::text || '-%d'", q, q), int64(client*1000+r), fmt.Sprint(client)).Scan(&sum, &text)
			t.add(err, err == nil && sum == int64(client*1000+r+q) && text == fmt.Sprintf("%d-%d", client, q))
		}
		if tx != nil {
			if err := tx.Commit(ctx); err != nil {
				t.add(err, false)
			}
		}
	}
}

func concurrently(n int, body func(i int)) {
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body(i)
		}()
	}
	wg.Wait()
}

var modes = []pgx.QueryExecMode{
	pgx.QueryExecModeCacheStatement, pgx.QueryExecModeCacheDescribe, pgx.QueryExecModeDescribeExec,
	pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol,
}

// execModes: cfg.Clients connections per query exec mode, each its own
// pgx.Conn, running 3 parameterised statements in cfg.Rounds rounds.
func execModes(ctx context.Context) step {
	compare, detail := map[string]any{}, map[string]any{}
	for _, mode := range modes {
		t := &tally{}
		concurrently(cfg.Clients, func(i int) {
			c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) { cc.DefaultQueryExecMode = mode })
			if err != nil {
				t.add(err, false)
				return
			}
			defer c.Close(context.Background())
			clientRounds(ctx, c, i, 3, t)
		})
		compare[mode.String()], detail[mode.String()] = t.compare(), t.detail()
	}
	return step{Compare: compare, Detail: detail}
}

// pool: a pgxpool of cfg.Clients connections shared by 4 times as many goroutines.
func pool(ctx context.Context) step {
	pc, err := pgxpool.ParseConfig(cfg.Conn)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	pc.MaxConns = int32(cfg.Clients)
	p, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer p.Close()
	t := &tally{}
	concurrently(4*cfg.Clients, func(i int) {
		for r := 0; r < cfg.Rounds; r++ {
			var sum int64
			err := p.QueryRow(ctx, "SELECT $1::int8 * 2", int64(i*100+r)).Scan(&sum)
			t.add(err, err == nil && sum == int64(2*(i*100+r)))
			err = pgx.BeginFunc(ctx, p, func(tx pgx.Tx) error {
				var n int64
				if err := tx.QueryRow(ctx, "SELECT $1::int8 + 1", int64(r)).Scan(&n); err != nil {
					return err
				}
				t.add(nil, n == int64(r+1))
				return nil
			})
			if err != nil {
				t.add(err, false)
			}
		}
	})
	return step{Compare: t.compare(), Detail: t.detail()}
}

// withSmallCaches runs body on cfg.Clients connections at once in each
// caching query exec mode, with statement and description caches of 2 entries
// (pgx evicts at nearly every statement), and tallies each mode on its own.
func withSmallCaches(ctx context.Context, body func(c *pgx.Conn, i int, t *tally)) step {
	compare, detail := map[string]any{}, map[string]any{}
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeCacheDescribe} {
		t := &tally{}
		concurrently(cfg.Clients, func(i int) {
			c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) {
				cc.DefaultQueryExecMode = mode
				cc.StatementCacheCapacity = 2
				cc.DescriptionCacheCapacity = 2
			})
			if err != nil {
				t.add(err, false)
				return
			}
			defer c.Close(context.Background())
			body(c, i, t)
		})
		compare[mode.String()], detail[mode.String()] = t.compare(), t.detail()
	}
	return step{Compare: compare, Detail: detail}
}

// cacheEviction: statement and description caches of 2 entries and 5
// statements in turn, so pgx evicts one at nearly every query (a Close of the
// evicted statement, in a pipeline with Sync, before the next query).
func cacheEviction(ctx context.Context) step {
	return withSmallCaches(ctx, func(c *pgx.Conn, i int, t *tally) {
		clientRounds(ctx, c, i, 5, t)
	})
}

// batchEviction: cfg.Clients connections with a statement cache of 2 send
// batches of 5 distinct statements (pgx prepares them all in one pipeline,
// evicting as it goes), every other batch in a transaction.
func batchEviction(ctx context.Context) step {
	return withSmallCaches(ctx, func(c *pgx.Conn, i int, t *tally) {
		for r := 0; r < cfg.Rounds; r++ {
			b := &pgx.Batch{}
			for q := 0; q < 5; q++ {
				b.Queue(fmt.Sprintf("SELECT $1::int8 * %d", q+2), int64(i*100+r))
			}
			var br pgx.BatchResults
			var tx pgx.Tx
			if r%2 == 0 {
				var err error
				if tx, err = c.Begin(ctx); err != nil {
					t.add(err, false)
					continue
				}
				br = tx.SendBatch(ctx, b)
			} else {
				br = c.SendBatch(ctx, b)
			}
			for q := 0; q < 5; q++ {
				var v int64
				err := br.QueryRow().Scan(&v)
				t.add(err, err == nil && v == int64((i*100+r)*(q+2)))
			}
			if err := br.Close(); err != nil {
				t.add(err, false)
			}
			if tx != nil {
				if err := tx.Commit(ctx); err != nil {
					t.add(err, false)
				}
			}
		}
	})
}

// explicitPrepare: every connection prepares the same name with its own
// text (conn.Prepare), runs it across transactions, Deallocates it, runs the
// name again (now SQL text), prepares it anew, then DeallocateAll.
func explicitPrepare(ctx context.Context) step {
	var mu sync.Mutex
	per := map[string]int{}
	note := func(what string, o outcome) {
		b, _ := json.Marshal(o)
		mu.Lock()
		per[what+" "+string(b)]++
		mu.Unlock()
	}
	t := &tally{}
	concurrently(cfg.Clients, func(i int) {
		c, err := connect(ctx, cfg.Conn, nil)
		if err != nil {
			t.add(err, false)
			return
		}
		defer c.Close(context.Background())
		run := func(what string) {
			var v int64
			err := c.QueryRow(ctx, "shared_name", int64(i)).Scan(&v)
			if err == nil && v != int64(i+1000*i) {
				note(what, outcome{Error: fmt.Sprintf("wrong result %d", v)})
				return
			}
			note(what, result("right", err))
		}
		_, err = c.Prepare(ctx, "shared_name", fmt.Sprintf("SELECT $1::int8 + %d", 1000*i))
		note("prepare", result("prepared", err))
		for r := 0; r < 6; r++ {
			if r%2 == 0 {
				_ = pgx.BeginFunc(ctx, c, func(pgx.Tx) error { run("in a transaction"); return nil })
			} else {
				run("alone")
			}
		}
		note("deallocate", result("deallocated", c.Deallocate(ctx, "shared_name")))
		run("after deallocate")
		_, err = c.Prepare(ctx, "shared_name", fmt.Sprintf("SELECT $1::int8 + %d", 1000*i))
		note("prepare again", result("prepared", err))
		run("prepared again")
		note("deallocate all", result("deallocated", c.DeallocateAll(ctx)))
		run("after deallocate all")
	})
	return step{Compare: per}
}

// copyConcurrent: cfg.Clients connections each CopyFrom 5,000 rows at once.
func copyConcurrent(ctx context.Context) step {
	t := &tally{}
	concurrently(cfg.Clients, func(i int) {
		c, err := connect(ctx, cfg.Conn, nil)
		if err != nil {
			t.add(err, false)
			return
		}
		defer c.Close(context.Background())
		n, err := c.CopyFrom(ctx, pgx.Identifier{table("copy")}, []string{"a", "b"}, pgx.CopyFromSlice(5_000, func(r int) ([]any, error) {
			return []any{int64(1_000_000 + i*10_000 + r), "concurrent"}, nil
		}))
		t.add(err, n == 5_000)
	})
	c, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer c.Close(context.Background())
	var rows int64
	err = c.QueryRow(ctx, fmt.Sprintf("SELECT count(*) FROM %s WHERE b = 'concurrent'", table("copy"))).Scan(&rows)
	return step{Compare: map[string]any{"copies": t.compare(), "rows": result(rows, err)}, Detail: t.detail()}
}

// cancelRequestHandler makes a context's end send a CancelRequest and keep
// the connection (pgx's default closes it).
func cancelRequestHandler(cc *pgx.ConnConfig) {
	cc.BuildContextWatcherHandler = func(pgConn *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: pgConn, DeadlineDelay: 5 * time.Second}
	}
}

// copyFail: a CopyFrom whose source fails half way (pgx sends CopyFail), and
// one whose context ends while the rows come slowly; then the rows left and
// the connection.
func copyFail(ctx context.Context) step {
	compare := map[string]any{}
	for _, variant := range []string{"sourceError", "contextTimeout"} {
		c, err := connect(ctx, cfg.Conn, cancelRequestHandler)
		if err != nil {
			return step{Compare: errorOf(err)}
		}
		defer c.Close(context.Background())
		copyCtx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		first := int64(2_000_000)
		if variant == "contextTimeout" {
			first = 3_000_000
		}
		i := int64(0)
		_, err = c.CopyFrom(copyCtx, pgx.Identifier{table("copy")}, []string{"a", "b"}, pgx.CopyFromFunc(func() ([]any, error) {
			i++
			switch {
			case variant == "sourceError" && i == 5_000:
				return nil, errors.New("the source failed")
			case variant == "contextTimeout" && i%100 == 0:
				time.Sleep(10 * time.Millisecond)
			case i > 1_000_000:
				return nil, nil
			}
			return []any{first + i, "failing"}, nil
		}))
		cancel()
		failed := errorOf(err)
		if err == nil {
			failed = outcome{Value: "copied"}
		}
		var left int64
		var next outcome
		if c.IsClosed() {
			next = outcome{Error: "connection closed"}
		} else {
			next = result(left, c.QueryRow(ctx, fmt.Sprintf("SELECT count(*) FROM %s WHERE a >= $1 AND a < $1 + 1000000", table("copy")), first).Scan(&left))
			next.Value = left
		}
		compare[variant] = map[string]any{"copy": failed, "rowsLeft": next}
	}
	return step{Compare: compare}
}

// largeStatement: a statement of about 300 KiB (a comment pads it) in each
// query exec mode: the sidecar keeps statements up to 256 KiB to prepare them again.
func largeStatement(ctx context.Context) step {
	compare := map[string]any{}
	pad := strings.Repeat("x", 300<<10)
	for _, mode := range modes {
		c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) { cc.DefaultQueryExecMode = mode })
		if err != nil {
			return step{Compare: errorOf(err)}
		}
		var outcomes []outcome
		for r := 0; r < 3; r++ {
			var v int64
			err := c.QueryRow(ctx, "SELECT $1::int8 + 1 /* "+pad+" */", int64(r)).Scan(&v)
			outcomes = append(outcomes, result(v, err))
		}
		compare[mode.String()] = squeezeOutcomes(outcomes)
		c.Close(context.Background())
	}
	return step{Compare: compare}
}

func squeezeOutcomes(outcomes []outcome) []string {
	texts := make([]string, len(outcomes))
	for i, o := range outcomes {
		b, _ := json.Marshal(o)
		texts[i] = string(b)
	}
	return squeeze(texts)
}

// cancelWhileQueued: 2 connections hold a statement each (the whole grant
// in transaction mode), and a third's pg_sleep(5) with a context of 300 ms is
// cancelled (CancelRequest handler): in transaction mode while it waits for a
// server connection, where the sidecar answers the cancel at once. Once with
// the holders done (1 s) before the driver gives up waiting for the cancel's
// answer (5 s after), once with the holders (2.5 s) outlasting it (1 s after).
func cancelWhileQueued(ctx context.Context) step {
	compare, detail := map[string]any{}, map[string]any{}
	for _, variant := range []struct {
		name         string
		hold, giveUp time.Duration
	}{
		{"holdersDoneFirst", time.Second, 5 * time.Second},
		{"driverGivesUpFirst", 2500 * time.Millisecond, time.Second},
	} {
		var holders [2]*pgx.Conn
		for i := range holders {
			c, err := connect(ctx, cfg.Conn, nil)
			if err != nil {
				return step{Compare: errorOf(err)}
			}
			defer c.Close(context.Background())
			holders[i] = c
		}
		c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) {
			cc.BuildContextWatcherHandler = func(pgConn *pgconn.PgConn) ctxwatch.Handler {
				return &pgconn.CancelRequestContextWatcherHandler{Conn: pgConn, DeadlineDelay: variant.giveUp}
			}
		})
		if err != nil {
			return step{Compare: errorOf(err)}
		}
		defer c.Close(context.Background())
		var wg sync.WaitGroup
		held := make([]outcome, len(holders))
		for i, h := range holders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := h.Exec(ctx, "SELECT pg_sleep($1::float8)", variant.hold.Seconds())
				held[i] = result("slept", err)
			}()
		}
		time.Sleep(200 * time.Millisecond)
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		started := time.Now()
		_, err = c.Exec(short, "SELECT pg_sleep(5)")
		cancel()
		waited := time.Since(started).Seconds()
		cancelled := errorOf(err)
		if err == nil {
			cancelled = outcome{Value: "not cancelled"}
		}
		next := outcome{Error: "connection closed"}
		if !c.IsClosed() {
			var v int64
			next = result(int64(42), c.QueryRow(ctx, "SELECT 42").Scan(&v))
		}
		wg.Wait()
		compare[variant.name] = map[string]any{"cancelled": cancelled, "next": next, "holders": held, "answeredBeforeGivingUp": waited < 0.3+variant.giveUp.Seconds()}
		detail[variant.name] = map[string]any{"seconds": waited}
	}
	return step{Compare: compare, Detail: detail}
}

func columns(ctx context.Context, c *pgx.Conn, sql string) outcome {
	rows, err := c.Query(ctx, sql)
	if err != nil {
		return errorOf(err)
	}
	defer rows.Close()
	var got [][]any
	for rows.Next() {
		values, err := rows.Values()
		if err != nil {
			return errorOf(err)
		}
		got = append(got, values)
	}
	if err := rows.Err(); err != nil {
		return errorOf(err)
	}
	return outcome{Value: got}
}

// schemaChange: 4 connections run SELECT * through their cached statement
// (each its own, in transaction mode on whichever server connection), then
// ALTER TABLE ... ADD COLUMN, then the same SELECT twice more.
func schemaChange(ctx context.Context) step {
	compare := map[string]any{}
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeCacheDescribe, pgx.QueryExecModeDescribeExec} {
		sql := "SELECT * FROM " + table("shape")
		conns := make([]*pgx.Conn, 4)
		for i := range conns {
			c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) { cc.DefaultQueryExecMode = mode })
			if err != nil {
				return step{Compare: errorOf(err)}
			}
			defer c.Close(context.Background())
			conns[i] = c
		}
		per := make([][]outcome, len(conns))
		// At once, so that in transaction mode the connections' statements land on different server connections.
		concurrently(len(conns), func(i int) { per[i] = append(per[i], columns(ctx, conns[i], sql)) })
		column := "c_" + strings.ReplaceAll(mode.String(), " ", "_")
		_, err := conns[0].Exec(ctx, fmt.Sprintf("ALTER TABLE %s ADD COLUMN %s int DEFAULT 2", table("shape"), column))
		if err != nil {
			return step{Compare: map[string]any{"alter": errorOf(err)}}
		}
		for round := 0; round < 2; round++ {
			concurrently(len(conns), func(i int) { per[i] = append(per[i], columns(ctx, conns[i], sql)) })
		}
		// Every connection saw the same here: one of them stands for all, a difference is kept whole.
		same := true
		for _, p := range per[1:] {
			a, _ := json.Marshal(p)
			b, _ := json.Marshal(per[0])
			same = same && string(a) == string(b)
		}
		if same {
			compare[mode.String()] = per[0]
		} else {
			compare[mode.String()] = per
		}
	}
	return step{Compare: compare}
}

// discardAll: a cached statement, then DISCARD ALL (which drops the
// connection's prepared statements), then the cached statement again.
func discardAll(ctx context.Context) step {
	c, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer c.Close(context.Background())
	var n int64
	first := result(n, c.QueryRow(ctx, "SELECT $1::int8 + 1", 1).Scan(&n))
	first.Value = n
	_, err = c.Exec(ctx, "DISCARD ALL")
	discard := result("DISCARD ALL", err)
	var outcomes []outcome
	for i := 0; i < 3; i++ {
		err := c.QueryRow(ctx, "SELECT $1::int8 + 1", int64(i)).Scan(&n)
		outcomes = append(outcomes, result(n, err))
	}
	return step{Compare: map[string]any{"first": first, "discard": discard, "after": outcomes}}
}

// batch: SendBatch of 50 queries, the 25th failing (division by zero), in
// two query modes; then the rows its inserts left, and the connection after.
func batch(ctx context.Context) step {
	compare := map[string]any{}
	variants := []struct {
		mode        pgx.QueryExecMode
		transaction bool
	}{
		{pgx.QueryExecModeCacheStatement, false}, {pgx.QueryExecModeExec, false}, {pgx.QueryExecModeSimpleProtocol, false},
		{pgx.QueryExecModeCacheDescribe, true},
	}
	for _, variant := range variants {
		mode := variant.mode
		c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) { cc.DefaultQueryExecMode = mode })
		if err != nil {
			return step{Compare: errorOf(err)}
		}
		defer c.Close(context.Background())
		base := int64(len(compare)) * 1000
		b := &pgx.Batch{}
		for i := int64(0); i < 50; i++ {
			switch {
			case i == 24:
				b.Queue("SELECT 1 / $1::int8", int64(0))
			case i%2 == 0:
				b.Queue(fmt.Sprintf("INSERT INTO %s VALUES ($1)", table("batch")), base+i)
			default:
				b.Queue("SELECT $1::int8", base+i)
			}
		}
		var tx pgx.Tx
		var br pgx.BatchResults
		if variant.transaction {
			if tx, err = c.Begin(ctx); err != nil {
				return step{Compare: errorOf(err)}
			}
			br = tx.SendBatch(ctx, b)
		} else {
			br = c.SendBatch(ctx, b)
		}
		var results []string
		for i := 0; i < 50; i++ {
			var err error
			var v int64
			if i%2 == 0 && i != 24 {
				_, err = br.Exec()
			} else {
				err = br.QueryRow().Scan(&v)
			}
			switch {
			case err != nil:
				results = append(results, errorOf(err).SQLState+errorOf(err).Error)
			case i%2 == 0:
				results = append(results, "ok")
			default:
				results = append(results, fmt.Sprint(v-base))
			}
		}
		closed := result("closed", br.Close())
		key := mode.String()
		var commit outcome
		if tx != nil {
			key += " in a transaction"
			commit = result("committed", tx.Commit(ctx))
		}
		var rows int64
		left := result(rows, c.QueryRow(ctx, fmt.Sprintf("SELECT count(*) FROM %s WHERE a >= $1 AND a < $1 + 1000", table("batch")), base).Scan(&rows))
		left.Value = rows
		compare[key] = map[string]any{"results": squeeze(results), "close": closed, "commit": commit, "rowsLeft": left}
	}
	return step{Compare: compare}
}

// squeeze writes runs of the same result once, with a count.
func squeeze(results []string) []string {
	var out []string
	for i := 0; i < len(results); {
		j := i
		for j < len(results) && results[j] == results[i] {
			j++
		}
		if j-i == 1 {
			out = append(out, results[i])
		} else {
			out = append(out, fmt.Sprintf("%s x%d", results[i], j-i))
		}
		i = j
	}
	return out
}

// copyFrom: 100,000 rows by binary COPY FROM STDIN, then the table's count and sum.
func copyFrom(ctx context.Context) step {
	c, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer c.Close(context.Background())
	const n = 100_000
	started := time.Now()
	copied, err := c.CopyFrom(ctx, pgx.Identifier{table("copy")}, []string{"a", "b"}, pgx.CopyFromSlice(n, func(i int) ([]any, error) {
		return []any{int64(i), fmt.Sprintf("row %d", i)}, nil
	}))
	elapsed := time.Since(started).Seconds()
	copyResult := result(copied, err)
	var count, sum int64
	var text string
	check := c.QueryRow(ctx, fmt.Sprintf("SELECT count(*), sum(a)::int8, max(b) FROM %s WHERE a < 1000000", table("copy"))).Scan(&count, &sum, &text)
	// A COPY that fails at a duplicate key half way: nothing copied, the connection usable.
	failing, err := c.CopyFrom(ctx, pgx.Identifier{table("batch")}, []string{"a"}, pgx.CopyFromSlice(10_000, func(i int) ([]any, error) {
		if i == 5_000 {
			return []any{int32(100_000)}, nil
		}
		return []any{int32(100_000 + i)}, nil
	}))
	failed := result(failing, err)
	var left int64
	leftErr := c.QueryRow(ctx, fmt.Sprintf("SELECT count(*) FROM %s WHERE a >= 100000", table("batch"))).Scan(&left)
	return step{
		Compare: map[string]any{
			"copyFrom": copyResult, "after": result([]any{count, sum, text}, check),
			"failingCopy": failed, "failingCopyLeft": result(left, leftErr),
		},
		Detail: map[string]any{"seconds": elapsed},
	}
}

// cancelTimeout: a context of 300 ms on pg_sleep(5), with pgx's default
// context handling (the connection's deadline: pgx closes the connection and
// sends a CancelRequest as it does) and with a CancelRequestContextWatcherHandler
// (a CancelRequest at once, the connection kept). Then: is the statement gone
// from the server within 3 s, and is the connection usable.
func cancelTimeout(ctx context.Context) step {
	admin, err := connect(ctx, cfg.Admin, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer admin.Close(context.Background())
	compare, detail := map[string]any{}, map[string]any{}
	for _, handler := range []string{"deadline", "cancelRequest"} {
		c, err := connect(ctx, cfg.Conn, func(cc *pgx.ConnConfig) {
			if handler == "cancelRequest" {
				cancelRequestHandler(cc)
			}
		})
		if err != nil {
			return step{Compare: errorOf(err)}
		}
		defer c.Close(context.Background())
		marker := "pgx_cancel_" + handler + "_" + cfg.Suffix
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		started := time.Now()
		_, err = c.Exec(short, fmt.Sprintf("SELECT pg_sleep(5) /* %s */", marker))
		cancel()
		waited := time.Since(started).Seconds()
		got := "no error"
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr):
			got = pgErr.Code
		case errors.Is(err, context.DeadlineExceeded):
			got = "context deadline exceeded"
		case err != nil:
			got = err.Error()
		}
		var running int64 = -1
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			_ = admin.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid() AND state = 'active'", marker).Scan(&running)
			if running == 0 {
				break
			}
		}
		closed := c.IsClosed()
		next := outcome{Error: "connection closed"}
		var nextSeconds float64
		if !closed {
			var v int64
			started = time.Now()
			next = result(int64(42), c.QueryRow(ctx, "SELECT 42").Scan(&v))
			nextSeconds = time.Since(started).Seconds()
		}
		compare[handler] = map[string]any{"error": got, "goneFromServer": running == 0, "closed": closed, "next": next, "fast": waited < 2 && nextSeconds < 1}
		detail[handler] = map[string]any{"seconds": waited, "nextSeconds": nextSeconds, "message": fmt.Sprint(err)}
	}
	return step{Compare: compare, Detail: detail}
}

// listenNotify: one connection LISTENs, another NOTIFYs, then the listener
// NOTIFYs itself; the payloads received and whose pid each carries.
func listenNotify(ctx context.Context) step {
	listener, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer listener.Close(context.Background())
	notifier, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer notifier.Close(context.Background())
	channel := "pgx_" + cfg.Suffix
	_, err = listener.Exec(ctx, "LISTEN "+channel)
	listen := result("LISTEN", err)
	wait := func(seconds int) (outcome, *pgconn.Notification) {
		w, cancel := context.WithTimeout(ctx, time.Duration(seconds)*time.Second)
		defer cancel()
		n, err := listener.WaitForNotification(w)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				return outcome{Error: "no notification in time"}, nil
			}
			return errorOf(err), nil
		}
		return outcome{Value: n.Payload}, n
	}
	_, err = notifier.Exec(ctx, "SELECT pg_notify($1, 'from another')", channel)
	notify := result("notified", err)
	fromOther, n1 := wait(3)
	// The extended protocol (a parameter) on the listener itself, after it waited.
	_, err = listener.Exec(ctx, "SELECT pg_notify($1, 'from itself')", channel)
	notifySelf := result("notified", err)
	fromSelf, n2 := wait(3)
	_, err = listener.Exec(ctx, "UNLISTEN "+channel)
	unlisten := result("UNLISTEN", err)
	_, _ = notifier.Exec(ctx, "SELECT pg_notify($1, 'after unlisten')", channel)
	afterUnlisten, _ := wait(1) // the others arrive at once: 1 s shows none comes
	pids := map[string]any{}
	if n1 != nil {
		pids["otherSenderIsNotifierPid"] = n1.PID == notifier.PgConn().PID()
	}
	if n2 != nil {
		pids["ownSenderIsOwnPid"] = n2.PID == listener.PgConn().PID()
	}
	return step{Compare: map[string]any{
		"listen": listen, "notify": notify, "fromOther": fromOther, "notifySelf": notifySelf, "fromSelf": fromSelf,
		"unlisten": unlisten, "afterUnlisten": afterUnlisten, "pids": pids,
	}}
}

// backendPid: pgx's PgConn().PID() (BackendKeyData) against pg_backend_pid()
// in two transactions.
func backendPid(ctx context.Context) step {
	c, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer c.Close(context.Background())
	var equal []bool
	for i := 0; i < 2; i++ {
		var pid uint32
		if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			return step{Compare: errorOf(err)}
		}
		equal = append(equal, pid == c.PgConn().PID())
	}
	return step{Compare: map[string]any{"pidIsBackendPid": equal}}
}

// savepoint: a transaction with a nested pgx transaction (SAVEPOINT) that
// fails and is rolled back to, then committed.
func savepoint(ctx context.Context) step {
	c, err := connect(ctx, cfg.Conn, nil)
	if err != nil {
		return step{Compare: errorOf(err)}
	}
	defer c.Close(context.Background())
	var steps []outcome
	tbl := table("savepoint")
	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1)", 1)
		steps = append(steps, result("insert 1", err))
		inner, err := tx.Begin(ctx)
		steps = append(steps, result("savepoint", err))
		if err != nil {
			return err
		}
		_, err = inner.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1)", 2)
		steps = append(steps, result("insert 2", err))
		_, err = inner.Exec(ctx, "INSERT INTO "+tbl+" VALUES (1 / $1::int)", 0)
		steps = append(steps, result("insert 1/0", err))
		steps = append(steps, result("rollback to savepoint", inner.Rollback(ctx)))
		_, err = tx.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1)", 3)
		steps = append(steps, result("insert 3", err))
		return err
	})
	steps = append(steps, result("commit", err))
	var got []int32
	rowsErr := func() error {
		rows, err := c.Query(ctx, "SELECT a FROM "+tbl+" ORDER BY a")
		if err != nil {
			return err
		}
		got, err = pgx.CollectRows(rows, pgx.RowTo[int32])
		return err
	}()
	sort.Slice(got, func(i, j int) bool { return got[i] < got[j] })
	return step{Compare: map[string]any{"steps": steps, "rows": result(got, rowsErr)}}
}
