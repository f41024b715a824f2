#!/usr/bin/env bash
# Idempotent set-up of everything the demo and the tests run on:
# Debian's PostgreSQL, OpenSSH server and PgBouncer, the database drivers the
# driver compatibility tests run (psycopg 3, psycopg2, asyncpg for Debian's
# python3, pgjdbc for the installed Java, DBD::Pg for Debian's perl, PHP's PDO_pgsql
# and pgsql for Debian's php, tokio-postgres's Debian crates, Ruby's pg, ActiveRecord and
# Sequel for Debian's ruby), and the pinned Kubernetes binaries
# built from Go modules (cached per version), and the sidecar's native socket
# I/O (a C file built with the system's compiler). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -n "$(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null)" ] || missing+=(postgresql postgresql-contrib)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
# Drivers for test/integration/drivers.test.ts: imported by Debian's own python3
# (a pyenv or venv python3 earlier on PATH would not see them), pgjdbc as a jar.
for module in psycopg:python3-psycopg psycopg2:python3-psycopg2 asyncpg:python3-asyncpg sqlalchemy:python3-sqlalchemy; do
  /usr/bin/python3 -c "import ${module%%:*}" >/dev/null 2>&1 || missing+=("${module#*:}")
done
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
# iptables for the lost-node test, which drops a sidecar's packets on loopback (it skips without it).
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables)
# A C compiler for the sidecar's native socket I/O (scripts/build-native.sh).
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
# Perl DBD::Pg for Debian's own perl (its DBI comes with it).
/usr/bin/perl -MDBD::Pg -e 1 >/dev/null 2>&1 || missing+=(libdbd-pg-perl)
# PHP's PDO_pgsql and pgsql extensions for Debian's php.
/usr/bin/php -r 'exit(extension_loaded("pdo_pgsql") && extension_loaded("pgsql") ? 0 : 1);' >/dev/null 2>&1 || missing+=(php-cli php-pgsql)
# tokio-postgres (Rust) and the crates test/drivers/tokio-postgres-driver builds offline from, as Debian
# packages them in /usr/share/cargo/registry; Debian's cargo where no cargo (rustup's included) is found.
for crate in tokio-postgres-0.7:librust-tokio-postgres-dev tokio-1.:librust-tokio-dev futures-util-0.3:librust-futures-util-dev serde_json-1.:librust-serde-json-dev bytes-1.:librust-bytes-dev; do
  compgen -G "/usr/share/cargo/registry/${crate%%:*}*" >/dev/null || missing+=("${crate#*:}")
done
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || missing+=(cargo)
# psqlODBC through unixODBC and pyodbc for Debian's python3 (test/drivers/drv_odbc.py).
/usr/bin/python3 -c 'import pyodbc, sys; sys.exit(0 if "PostgreSQL Unicode" in pyodbc.drivers() else 1)' >/dev/null 2>&1 || missing+=(python3-pyodbc odbc-postgresql unixodbc)
# Ruby's pg gem, ActiveRecord and Sequel for Debian's ruby (test/integration/ruby-drivers.test.ts).
/usr/bin/ruby -e 'require "pg"; require "active_record"; require "sequel"' >/dev/null 2>&1 || missing+=(ruby ruby-pg ruby-activerecord ruby-sequel)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages start a default cluster and pgbouncer service where an init system
    # exists; poolkeeper's environment runs its own on free ports and needs neither.
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -x node_modules/.bin/node ]; then
  echo "setup: node_modules is missing; run 'npm ci' first (it installs the pinned Node.js 24 too)" >&2
  exit 1
fi

bash scripts/build-native.sh
bash scripts/build-kube.sh
bash scripts/build-tools.sh || echo "setup: helm or promtool did not build (see above); the chart and alert tests that need them will skip" >&2
