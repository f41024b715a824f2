// pgx-probe connects with pgx v5 to the connection string in its argument,
// runs a few statements and prints one JSON line: what the connection is
// (TLS version, ALPN protocol), what the statements returned, or the error.
// test/integration/sidecar-client-tls.test.ts runs it against the sidecar
// for PostgreSQL 17's direct TLS negotiation (sslnegotiation=direct).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

type result struct {
	OK          bool   `json:"ok"`
	Error       string `json:"error,omitempty"`
	TLSVersion  string `json:"tlsVersion,omitempty"`
	ALPN        string `json:"alpn,omitempty"`
	Sum         int64  `json:"sum,omitempty"`
	CurrentUser string `json:"currentUser,omitempty"`
	BigBytes    int64  `json:"bigBytes,omitempty"`
	BigRows     int64  `json:"bigRows,omitempty"`
	Cancel      string `json:"cancel,omitempty"`
	After       int64  `json:"after,omitempty"`
}

func main() {
	out := result{}
	if err := run(os.Args[1], &out); err != nil {
		out.Error = err.Error()
	} else {
		out.OK = true
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

func run(connString string, out *result) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if tlsConn, ok := conn.PgConn().Conn().(*tls.Conn); ok {
		state := tlsConn.ConnectionState()
		out.TLSVersion = tls.VersionName(state.Version)
		out.ALPN = state.NegotiatedProtocol
	}
	if err := conn.QueryRow(ctx, "SELECT $1::int8 + $2::int8", 40, 2).Scan(&out.Sum); err != nil {
		return err
	}
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&out.CurrentUser); err != nil {
		return err
	}
	// About 1 MB in 1,024 rows of 1 KB: many TLS records each way of the sidecar.
	rows, err := conn.Query(ctx, "SELECT repeat(md5(n::text), 32) FROM generate_series(1, 1024) AS n")
	if err != nil {
		return err
	}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return err
		}
		out.BigRows++
		out.BigBytes += int64(len(s))
	}
	if err := rows.Err(); err != nil {
		return err
	}
	// A CancelRequest from pgx goes on a connection of its own, encrypted the same way (direct TLS too).
	go func() {
		time.Sleep(300 * time.Millisecond)
		_ = conn.PgConn().CancelRequest(ctx)
	}()
	_, err = conn.Exec(ctx, "SELECT pg_sleep(10)")
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr):
		out.Cancel = pgErr.Code
	case err != nil:
		out.Cancel = err.Error()
	default:
		out.Cancel = "not cancelled"
	}
	return conn.QueryRow(ctx, "SELECT 7").Scan(&out.After)
}
