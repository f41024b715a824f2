# Ruby's pg gem, ActiveRecord and Sequel against one target. Run by
# test/integration/ruby-drivers.test.ts as
#   /usr/bin/ruby drv_ruby.rb '<json config>'
# and prints one JSON object on its last line: for each step, `compare` (what
# must be the same through the sidecar as direct) and `detail` (timings,
# error texts: reported, not compared). Without the gems it prints
# {"skipped": "..."}.
#
# The config names the target ({host, port, user, password, dbname}), a
# suffix for table names, the mode and how many clients take turns; `only`
# (a list of step names) runs just those, for a look at one. In transaction
# mode the sidecar under test has a small grant (2), so the clients'
# transactions move between server connections.
#
# ActiveRecord 6.1 with prepared_statements (Rails' default) prepares each
# statement it runs with bind parameters under a1, a2, ... (a counter per
# connection, so every connection uses the same names for different texts)
# and keeps them for the connection's life.

require 'json'
require 'socket'
require 'timeout'

CFG = JSON.parse(ARGV[0])
begin
  require 'pg'
  require 'active_record'
rescue LoadError => e
  puts JSON.generate(skipped: "#{e.message} (Debian: ruby ruby-pg ruby-activerecord ruby-sequel)")
  exit 0
end
SEQUEL = begin
  require 'sequel'
  true
rescue LoadError
  false
end

T = CFG['target']
SUFFIX = CFG['suffix']
CLIENTS = CFG['clients']
TRANSACTION_MODE = CFG['mode'] == 'transaction'

def conninfo(login = T)
  { host: login['host'], port: login['port'], user: login['user'], password: login['password'],
    dbname: login['dbname'], connect_timeout: 10, sslmode: 'disable' }
end

def connect(login = T)
  PG.connect(conninfo(login))
end

def sqlstate(error)
  if error.respond_to?(:result) && error.result && (s = error.result.error_field(PG::Result::PG_DIAG_SQLSTATE))
    return s
  end
  cause = error.respond_to?(:cause) ? error.cause : nil
  return sqlstate(cause) if cause.is_a?(PG::Error)
  error.class.name
end

# A step's outcome as compared: its value, or the SQLSTATE of its error.
def outcome
  { 'value' => yield }
rescue StandardError => e
  { 'sqlstate' => sqlstate(e), 'message' => e.message.lines.first.to_s.strip }
end

# Only the compared part of an outcome (messages name objects that differ per target).
def compared(o)
  o.key?('sqlstate') ? { 'sqlstate' => o['sqlstate'] } : o
end

RESULT = {}

def step(name, seconds = 20)
  return if CFG['only'] && !CFG['only'].include?(name) && name != 'setup'

  warn "step #{name}"
  started = Time.now
  compare, detail = Timeout.timeout(seconds) { yield }
  RESULT[name] = { compare: compare, detail: (detail || {}).merge(seconds: (Time.now - started).round(2)) }
rescue Timeout::Error
  RESULT[name] = { compare: { hang: "#{name}: no result within #{seconds} s" } }
rescue StandardError => e
  RESULT[name] = { compare: { error: sqlstate(e) }, detail: { message: e.message.lines.first.to_s.strip, at: e.backtrace&.first } }
end

# Runs the block in `n` threads at once; their results in order.
def concurrently(n, &block)
  Array.new(n) { |i| Thread.new(i, &block) }.map(&:value)
end

# Counts failures and wrong answers of many runs; keeps a few error samples.
class Tally
  attr_reader :runs, :failed, :wrong, :errors

  def initialize
    @runs = 0
    @failed = 0
    @wrong = 0
    @errors = Hash.new(0)
    @lock = Mutex.new
  end

  def check(expected)
    got = yield
    @lock.synchronize do
      @runs += 1
      @wrong += 1 unless got == expected
    end
  rescue StandardError => e
    @lock.synchronize do
      @runs += 1
      @failed += 1
      @errors["#{sqlstate(e)} #{e.message.lines.first.to_s.strip[0, 120]}"] += 1
    end
  end

  def compare
    { failed: @failed, wrong: @wrong }
  end

  def detail
    { runs: @runs, errors: @errors.sort_by { |_, v| -v }.first(5).to_h }
  end
end

ITEMS = "rb_items_#{SUFFIX}"
COPY_TABLE = "rb_copy_#{SUFFIX}"

ActiveRecord::Base.logger = nil
def ar_config(extra = {})
  { adapter: 'postgresql', host: T['host'], port: T['port'], username: T['user'], password: T['password'],
    database: T['dbname'], prepared_statements: true, pool: CLIENTS, checkout_timeout: 20, connect_timeout: 10 }.merge(extra)
end
ActiveRecord::Base.establish_connection(ar_config)

# The model, on the per-run table.
class Item < ActiveRecord::Base
  self.table_name = "rb_items_#{JSON.parse(ARGV[0])['suffix']}"
end

step('setup') do
  c = connect
  c.exec("DROP TABLE IF EXISTS #{ITEMS}, #{COPY_TABLE}")
  c.exec("CREATE TABLE #{ITEMS} (id bigserial PRIMARY KEY, k int NOT NULL, name text NOT NULL, qty int NOT NULL DEFAULT 0, CONSTRAINT #{ITEMS}_k UNIQUE (k))")
  c.exec("INSERT INTO #{ITEMS} (k, name, qty) SELECT g, 'item' || g, g * 10 FROM generate_series(1, 100) g")
  c.exec("CREATE TABLE #{COPY_TABLE} (a int PRIMARY KEY, b text NOT NULL)")
  c.close
  [{ value: 'created' }]
end

# --- ActiveRecord ----------------------------------------------------------

# Each client runs the same queries in its own order, so that a1, a2, ... name
# different texts on different connections, with clients taking turns.
step('arPreparedTakingTurns') do
  tally = Tally.new
  queries = [
    ->(k) { [Item.find_by(k: k)&.name, "item#{k}"] },
    ->(k) { [Item.where(k: k).pluck(:qty).first, k * 10] },
    ->(k) { [Item.where('k <= ?', k).count, k] },
    ->(k) { [Item.where(k: [k, k + 1]).order(:k).pluck(:k), [k, k + 1]] },
    ->(k) { [Item.where(name: "item#{k}").exists?, true] },
    ->(k) { [Item.find(Item.where(k: k).pick(:id)).k, k] },
  ]
  held = concurrently(CLIENTS) do |i|
    ActiveRecord::Base.connection_pool.with_connection do |conn|
      order = queries.rotate(i)
      30.times do |round|
        k = (i * 7 + round) % 80 + 10
        order.each do |q|
          if round.odd?
            tally.check(true) { Item.transaction { got, want = q.call(k); got == want } }
          else
            tally.check(true) { got, want = q.call(k); got == want }
          end
        end
      end
      conn.instance_variable_get(:@statements)&.length.to_i # the aN it holds
    end
  end
  [tally.compare, tally.detail.merge(statementsHeldPerClient: held)]
end

# statement_limit: 2 makes ActiveRecord evict (DEALLOCATE aN, sent as SQL) at
# nearly every new statement, each client taking turns with the others.
step('arStatementEviction') do
  ActiveRecord::Base.establish_connection(ar_config(statement_limit: 2))
  tally = Tally.new
  concurrently(CLIENTS) do |i|
    ActiveRecord::Base.connection_pool.with_connection do
      15.times do |round|
        k = (i * 3 + round) % 80 + 10
        checks = [
          -> { [Item.find_by(k: k)&.name, "item#{k}"] },
          -> { [Item.where(k: k).pick(:qty), k * 10] },
          -> { [Item.where(name: "item#{k}").pick(:k), k] },
          -> { [Item.where(k: k, name: "item#{k}").count, 1] },
        ].rotate(i)
        checks.each do |q|
          tally.check(true) { round.odd? ? Item.transaction { got, want = q.call; got == want } : (got, want = q.call; got == want) }
        end
      end
    end
  end
  ActiveRecord::Base.establish_connection(ar_config)
  [tally.compare, tally.detail]
end

# Clients whose cached statements select every column of a table that then
# gains one: ActiveRecord deallocates and prepares again outside a
# transaction, and raises PreparedStatementCacheExpired inside one.
step('arSchemaChange') do
  table = "rb_schema_#{SUFFIX}"
  model = Class.new(ActiveRecord::Base) { self.table_name = table }
  ddl = connect
  ddl.exec("CREATE TABLE #{table} (id serial PRIMARY KEY, k int)")
  ddl.exec("INSERT INTO #{table} (k) SELECT g FROM generate_series(1, 10) g")
  ActiveRecord::Base.connection_pool.release_connection # every connection of the pool to the clients
  ready = Queue.new
  altered = Queue.new
  select = lambda do |c, i|
    c.exec_query("SELECT * FROM #{table} WHERE k = $1", 'q', [ActiveRecord::Relation::QueryAttribute.new('k', i + 1, ActiveModel::Type::Integer.new)], prepare: true)
  end
  threads = Array.new(CLIENTS) do |i|
    Thread.new do
      ActiveRecord::Base.connection_pool.with_connection do |c|
        steps = {}
        steps[:before] = outcome { select.call(c, i).columns }
        ready << true
        altered.pop
        steps[:inTransaction] = outcome { model.transaction { select.call(c, i).columns } }
        steps[:after] = outcome { select.call(c, i).columns }
        steps[:again] = outcome { select.call(c, i).rows }
        steps.transform_values { |v| compared(v) }
      end
    end
  end
  CLIENTS.times { ready.pop }
  ddl.exec("ALTER TABLE #{table} ADD COLUMN extra text DEFAULT 'x'")
  CLIENTS.times { altered << true }
  clients = threads.map(&:value).uniq
  ddl.exec("DROP TABLE #{table}")
  ddl.close
  [{ clients: clients }]
end

# As a Rails process connects: Encoding.default_internal set (pg then sends
# `set client_encoding to 'UTF8'`) and `encoding: unicode` in the database
# configuration (ActiveRecord sends it too), 4 threads taking turns with
# prepared statements and text beyond ASCII.
step('arRailsEncoding') do
  previous = Encoding.default_internal
  Encoding.default_internal = Encoding::UTF_8
  ActiveRecord::Base.establish_connection(ar_config(encoding: 'unicode'))
  tally = Tally.new
  shown = concurrently(CLIENTS) do |i|
    ActiveRecord::Base.connection_pool.with_connection do |c|
      8.times do |round|
        text = "caf\u00e9 \u2713 #{i}-#{round}"
        bind = [ActiveRecord::Relation::QueryAttribute.new('t', text, ActiveModel::Type::String.new)]
        tally.check([text, text.length, 'UTF-8']) do
          run = -> { c.exec_query('SELECT $1::text AS t, length($1::text) AS n', 'q', bind, prepare: true).rows.first.then { |t, n| [t, n, t.encoding.name] } }
          round.odd? ? c.transaction { run.call } : run.call
        end
      end
      c.select_value('SHOW client_encoding')
    end
  end
  ActiveRecord::Base.establish_connection(ar_config)
  Encoding.default_internal = previous
  [tally.compare.merge(clientEncoding: shown.uniq), tally.detail]
end

step('arTransactions') do
  r = {}
  conn = Item.connection
  r[:commit] = outcome { Item.transaction { Item.create!(k: 1001, name: 'a') }.k }
  r[:rollback] = outcome do
    Item.transaction do
      Item.create!(k: 1002, name: 'b')
      raise ActiveRecord::Rollback
    end
    Item.where(k: 1002).count
  end
  r[:savepoint] = outcome do
    Item.transaction do
      Item.create!(k: 1003, name: 'c')
      Item.transaction(requires_new: true) do
        Item.create!(k: 1004, name: 'd')
        raise ActiveRecord::Rollback
      end
      Item.create!(k: 1005, name: 'e')
    end
    Item.where(k: 1003..1005).order(:k).pluck(:k)
  end
  r[:uniqueInSavepoint] = outcome do
    Item.transaction do
      begin
        Item.transaction(requires_new: true) { Item.create!(k: 1001, name: 'dup') }
      rescue ActiveRecord::RecordNotUnique => e
        r[:uniqueError] = sqlstate(e)
      end
      Item.create!(k: 1006, name: 'f')
    end
    Item.where(k: 1006).count
  end
  r[:errorThenRollback] = outcome do
    Item.transaction do
      Item.create!(k: 1007, name: 'g')
      conn.execute('SELECT 1/0')
    end
  end
  r[:afterError] = outcome { [Item.where(k: 1007).count, conn.transaction_open?] }
  r[:abortedTransaction] = outcome do
    Item.transaction do
      begin
        conn.execute('SELECT 1/0')
      rescue ActiveRecord::StatementInvalid
        nil
      end
      Item.where(k: 1).count
    end
  end
  r[:lockBang] = outcome do
    Item.transaction do
      item = Item.find_by!(k: 2)
      item.lock!
      item.update!(qty: item.qty + 1)
    end
    Item.find_by!(k: 2).qty
  end
  [r.transform_values { |v| v.is_a?(Hash) ? compared(v) : v }, r]
end

# Two clients take the same row's lock with with_lock (SELECT ... FOR UPDATE):
# the second waits until the first's transaction ends.
step('arWithLock') do
  id = Item.where(k: 3).pick(:id)
  order = Queue.new
  first_in = Queue.new
  concurrently(2) do |i|
    ActiveRecord::Base.connection_pool.with_connection do
      sleep 0.3 if i == 1
      first_in.pop if i == 1
      Item.find(id).with_lock do
        order << "#{i} in"
        first_in << true if i.zero?
        sleep 0.8 if i.zero?
        Item.where(id: id).update_all('qty = qty + 1')
        order << "#{i} out"
      end
    end
  end
  events = []
  events << order.pop until order.empty?
  [{ order: events, qty: Item.find(id).qty }]
end

# Session advisory locks as Rails' migrations and with_advisory_lock take
# them: another connection must not get the lock while it is held, in and
# between the holder's transactions.
step('advisoryLocks') do
  key = 42_000 + SUFFIX.hash.abs % 1000
  a = connect
  b = connect
  value = ->(c, sql) { outcome { c.exec(sql).getvalue(0, 0) } }
  r = {}
  r[:lock] = value.call(a, "SELECT pg_advisory_lock(#{key})")
  r[:otherTryWhileHeld] = value.call(b, "SELECT pg_try_advisory_lock(#{key})")
  3.times { |i| a.exec("SELECT #{i}") }
  r[:holderTransaction] = outcome { a.transaction { |c| c.exec("SELECT count(*) FROM #{ITEMS}").getvalue(0, 0) } }
  r[:otherTryLater] = value.call(b, "SELECT pg_try_advisory_lock(#{key})")
  r[:heldInPgLocks] = value.call(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = #{key} AND granted")
  r[:unlock] = value.call(a, "SELECT pg_advisory_unlock(#{key})")
  r[:otherTryAfterUnlock] = value.call(b, "SELECT pg_try_advisory_lock(#{key})")
  r[:otherUnlock] = value.call(b, "SELECT pg_advisory_unlock(#{key})")
  r[:xactLock] = outcome { a.transaction { |c| c.exec("SELECT pg_advisory_xact_lock(#{key})") && b.exec("SELECT pg_try_advisory_lock(#{key})").getvalue(0, 0) } }
  r[:xactLockReleased] = value.call(b, "SELECT pg_try_advisory_lock(#{key}) AND pg_advisory_unlock(#{key})")
  a.close
  b.close
  [r.transform_values { |v| compared(v) }, r]
end

# ActiveRecord's own advisory locks (get_advisory_lock, as the migrator and
# the with_advisory_lock gem take them) and a migration run by the migrator,
# which holds pg_advisory_lock around it.
step('arAdvisoryLocks') do
  r = {}
  lock_id = 7_000_000 + SUFFIX.hash.abs % 1000
  pool = ActiveRecord::Base.connection_pool
  # Another client's attempt, on a connection of its own that ends after it.
  # In transaction mode a connection that ran an advisory lock function is
  # pinned to its server connection until it disconnects: kept in the pool,
  # two such connections would hold the whole grant of 2.
  other = lambda do |&attempt|
    Thread.new do
      c = pool.checkout
      begin
        attempt.call(c)
      ensure
        pool.remove(c)
        c.disconnect!
      end
    end.value
  end
  pool.with_connection do |holder|
    r[:get] = outcome { holder.get_advisory_lock(lock_id) }
    r[:otherGetWhileHeld] = outcome { other.call { |c| c.get_advisory_lock(lock_id) } }
    Item.where(k: 5).first
    r[:release] = outcome { holder.release_advisory_lock(lock_id) }
    r[:otherAfterRelease] = outcome { other.call { |c| [c.get_advisory_lock(lock_id), c.release_advisory_lock(lock_id)] } }
  end
  # The holder is pinned too: give it back, as a Rails process whose
  # connection took a session lock would have to.
  pool.disconnect!
  migration = Class.new(ActiveRecord::Migration[6.1]) do
    def change
      create_table("rb_migrated_#{JSON.parse(ARGV[0])['suffix']}") { |t| t.string :title }
    end
  end
  proxy = Struct.new(:name, :version, :filename, :scope, :migration) do
    def mismatch?(*) = false
    def basename = filename
    delegate :migrate, :announce, :write, :disable_ddl_transaction, to: :migration
  end
  table = "rb_migrated_#{SUFFIX}"
  migrations = [proxy.new('CreateMigrated', 20_240_101_000_000 + SUFFIX.hash.abs % 1000, 'x.rb', '', migration.new('CreateMigrated', 1))]
  ActiveRecord::Migration.verbose = false
  schema = ActiveRecord::SchemaMigration
  schema.table_name = "rb_schema_migrations_#{SUFFIX}"
  r[:migrateUp] = outcome do
    schema.create_table
    ActiveRecord::Migrator.new(:up, migrations, schema).migrate
    ActiveRecord::Base.connection.table_exists?(table)
  end
  r[:migrateDown] = outcome do
    ActiveRecord::Migrator.new(:down, migrations, schema).migrate
    ActiveRecord::Base.connection.table_exists?(table)
  end
  ActiveRecord::Base.connection.execute("DROP TABLE IF EXISTS #{schema.table_name}, #{table}")
  [r.transform_values { |v| compared(v) }, r]
end

# A connection pinned by an advisory lock, its statements evicted (DEALLOCATE
# as SQL) at nearly every query, a SET while pinned, then it disconnects.
step('arPinnedEviction') do
  config = ar_config(pool: 1, statement_limit: 2)
  pool = ActiveRecord::ConnectionAdapters::ConnectionHandler.new.establish_connection(
    ActiveRecord::DatabaseConfigurations::HashConfig.new('test', 'primary', config.transform_keys(&:to_s))
  )
  tally = Tally.new
  r = {}
  pool.with_connection do |c|
    bind = ->(v) { [ActiveRecord::Relation::QueryAttribute.new('k', v, ActiveModel::Type::Integer.new)] }
    queries = [
      ->(k) { c.exec_query("SELECT name FROM #{ITEMS} WHERE k = $1", 'q', bind.call(k), prepare: true).rows.first&.first == "item#{k}" },
      ->(k) { c.exec_query("SELECT qty FROM #{ITEMS} WHERE k = $1", 'q', bind.call(k), prepare: true).rows.first&.first == k * 10 },
      ->(k) { c.exec_query("SELECT k FROM #{ITEMS} WHERE name = 'item' || $1", 'q', bind.call(k), prepare: true).rows.first&.first == k },
    ]
    r[:lock] = outcome { c.get_advisory_lock(4242) }
    r[:set] = outcome { c.execute('SET lock_timeout = 2345') && c.select_value('SHOW lock_timeout') }
    10.times { |round| queries.each { |q| tally.check(true) { q.call(round + 10) } } }
    r[:release] = outcome { c.release_advisory_lock(4242) }
    10.times { |round| queries.rotate(1).each { |q| tally.check(true) { c.transaction { q.call(round + 20) } } } }
    r[:setKept] = outcome { c.select_value('SHOW lock_timeout') }
  end
  pool.disconnect!
  [tally.compare.merge(r.transform_values { |v| compared(v) }), tally.detail]
end

# A Ruby Timeout (as rack-timeout raises in a request) interrupting
# async_exec: pg 1.4.5 does not cancel; the next query waits for the
# interrupted one. Alone and inside a transaction.
step('pgTimeoutInterrupt') do
  c = connect
  r = {}
  interrupt = lambda do
    Timeout.timeout(0.2) { c.async_exec('SELECT pg_sleep(0.8)') }
    'not interrupted'
  rescue Timeout::Error
    'interrupted'
  end
  r[:alone] = interrupt.call
  r[:next] = outcome { c.exec('SELECT 42').getvalue(0, 0) }
  c.exec('BEGIN')
  r[:inTransaction] = interrupt.call
  r[:status] = c.transaction_status
  r[:nextInTransaction] = outcome { c.exec('SELECT 43').getvalue(0, 0) }
  r[:rollback] = outcome { c.exec('ROLLBACK').cmd_status }
  r[:after] = outcome { c.exec('SELECT 44').getvalue(0, 0) }
  c.close
  [r]
end

step('arReconnectVerify') do
  config = ar_config(pool: 1, variables: { statement_timeout: '1234' })
  pool = ActiveRecord::ConnectionAdapters::ConnectionHandler.new.establish_connection(
    ActiveRecord::DatabaseConfigurations::HashConfig.new('test', 'primary', config.transform_keys(&:to_s))
  )
  r = {}
  pool.with_connection do |c|
    show = ->(name) { c.select_value("SHOW #{name}") }
    r[:configured] = outcome { show.call('statement_timeout') }
    r[:set] = outcome { c.execute('SET lock_timeout = 4321') && show.call('lock_timeout') }
    r[:prepared] = outcome { c.exec_query("SELECT $1::int + 1 AS v", 'q', [ActiveRecord::Relation::QueryAttribute.new('v', 41, ActiveModel::Type::Integer.new)], prepare: true).rows }
    r[:verify] = outcome { c.verify! && c.active? }
    r[:afterVerify] = outcome { [show.call('lock_timeout'), show.call('statement_timeout')] }
    r[:reconnect] = outcome { c.reconnect! && c.active? }
    r[:afterReconnect] = outcome { [show.call('lock_timeout'), show.call('statement_timeout'), show.call('TimeZone')] }
    r[:preparedAfterReconnect] = outcome { c.exec_query("SELECT $1::int + 1 AS v", 'q', [ActiveRecord::Relation::QueryAttribute.new('v', 1, ActiveModel::Type::Integer.new)], prepare: true).rows }
    r[:disconnectThenVerify] = outcome { c.disconnect! || true; c.verify!; c.select_value('SELECT 42') }
  end
  pool.disconnect!
  [r.transform_values { |v| compared(v) }, r]
end

# ActiveRecord's pool of 5 shared by 10 threads, each a transaction after another.
step('arPoolThreads') do
  ActiveRecord::Base.establish_connection(ar_config(pool: 5))
  tally = Tally.new
  concurrently(10) do |i|
    20.times do |round|
      k = (i * 11 + round) % 80 + 10
      # As Rails' executor does around each request: the connection goes back to the pool after it.
      tally.check([k * 10, "item#{k}"]) do
        ActiveRecord::Base.connection_pool.with_connection do
          round.even? ? Item.transaction { Item.where(k: k).pick(:qty, :name) } : Item.where(k: k).pick(:qty, :name)
        end
      end
    end
  end
  stat = ActiveRecord::Base.connection_pool.stat
  ActiveRecord::Base.establish_connection(ar_config)
  [tally.compare, tally.detail.merge(pool: stat)]
end

# --- pg ------------------------------------------------------------------

step('pgExecParams') do
  tally = Tally.new
  concurrently(CLIENTS) do |i|
    c = connect
    40.times do |round|
      k = (i * 13 + round) % 80 + 10
      tally.check(["item#{k}", (k * 10).to_s, (k + i).to_s]) do
        run = lambda do
          c.exec_params("SELECT name, qty::text, ($2::int + $3::int)::text FROM #{ITEMS} WHERE k = $1", [k, k, i]).values.first
        end
        round.odd? ? c.transaction { run.call } : run.call
      end
    end
    c.close
  end
  [tally.compare, tally.detail]
end

# Every client prepares the same names with its own texts.
step('pgPrepared') do
  tally = Tally.new
  lifecycle = concurrently(CLIENTS) do |i|
    c = connect
    c.prepare('rb_stmt', "SELECT $1::int + #{i * 1000}")
    c.prepare('rb_other', "SELECT name FROM #{ITEMS} WHERE k = $1 + #{i}")
    12.times do |round|
      tally.check([(round + i * 1000).to_s, "item#{round + 1 + i}"]) do
        run = -> { [c.exec_prepared('rb_stmt', [round]).getvalue(0, 0), c.exec_prepared('rb_other', [round + 1]).getvalue(0, 0)] }
        round % 3 == 1 ? c.transaction { run.call } : run.call
      end
    end
    steps = {}
    steps[:describe] = outcome { c.describe_prepared('rb_stmt').nparams }
    steps[:deallocate] = outcome { c.exec('DEALLOCATE rb_stmt').cmd_status }
    steps[:afterDeallocate] = outcome { c.exec_prepared('rb_stmt', [1]).getvalue(0, 0) }
    steps[:prepareAgain] = outcome { c.prepare('rb_stmt', "SELECT $1::int * #{i + 2}") && c.exec_prepared('rb_stmt', [5]).getvalue(0, 0) }
    steps[:prepareTwice] = outcome { c.prepare('rb_stmt', 'SELECT 1') }
    c.close
    steps.transform_values { |v| compared(v) }
  end
  [tally.compare.merge(lifecycle: lifecycle), tally.detail]
end

step('pgCancel') do
  c = connect
  c.send_query('SELECT pg_sleep(5)')
  sleep 0.3
  started = Time.now
  cancel = c.cancel
  result = outcome { c.get_last_result }
  seconds = (Time.now - started).round(2)
  nxt = outcome { c.exec('SELECT 42').getvalue(0, 0) }
  c.close
  [{ cancel: cancel, result: compared(result), within2s: seconds < 2, next: nxt }, { seconds: seconds }]
end

step('pgStatementTimeout') do
  c = connect
  other = connect
  r = {}
  r[:set] = outcome { c.exec('SET statement_timeout = 300').cmd_status }
  r[:sleep] = outcome { c.async_exec('SELECT pg_sleep(3)').getvalue(0, 0) }
  r[:next] = outcome { c.async_exec('SELECT 42').getvalue(0, 0) }
  r[:inTransaction] = outcome { c.transaction { c.async_exec('SELECT pg_sleep(3)') } }
  r[:show] = outcome { c.exec('SHOW statement_timeout').getvalue(0, 0) }
  r[:otherClient] = outcome { Array.new(4) { other.exec('SHOW statement_timeout').getvalue(0, 0) }.uniq }
  r[:otherSleeps] = outcome { other.exec('SELECT pg_sleep(0.5)').getvalue(0, 0) }
  c.close
  other.close
  [r.transform_values { |v| compared(v) }, r]
end

step('pgCopy') do
  c = connect
  r = {}
  r[:in] = outcome do
    c.copy_data("COPY #{COPY_TABLE} (a, b) FROM STDIN") { 1000.times { |i| c.put_copy_data("#{i}\tv#{i}\n") } }.cmd_tuples
  end
  r[:out] = outcome do
    rows = []
    c.copy_data("COPY (SELECT a, b FROM #{COPY_TABLE} ORDER BY a) TO STDOUT") { while (row = c.get_copy_data) do rows << row end }
    [rows.length, rows.sum { |l| l.split("\t").first.to_i }, rows.last]
  end
  r[:badRow] = outcome { c.copy_data("COPY #{COPY_TABLE} (a, b) FROM STDIN") { c.put_copy_data("5000\tok\n"); c.put_copy_data("x\ty\n") } }
  r[:blockRaises] = outcome { c.copy_data("COPY #{COPY_TABLE} (a, b) FROM STDIN") { c.put_copy_data("6000\tok\n"); raise ArgumentError, 'source failed' } }
  r[:afterBad] = outcome { c.exec("SELECT count(*) FROM #{COPY_TABLE}").getvalue(0, 0) }
  r[:inTransactionRolledBack] = outcome do
    inside = nil
    c.transaction do
      c.copy_data("COPY #{COPY_TABLE} (a, b) FROM STDIN") { c.put_copy_data("9999\tz\n") }
      inside = c.exec("SELECT count(*) FROM #{COPY_TABLE}").getvalue(0, 0)
      raise PG::Error, 'roll back'
    rescue PG::Error => e
      raise unless e.message == 'roll back'
      raise ActiveRecord::Rollback
    end
  rescue ActiveRecord::Rollback
    [inside, c.exec("SELECT count(*) FROM #{COPY_TABLE}").getvalue(0, 0)]
  end
  r[:coder] = outcome do
    enco = PG::TextEncoder::CopyRow.new
    c.copy_data("COPY #{COPY_TABLE} (a, b) FROM STDIN", enco) { (2000..2099).each { |i| c.put_copy_data([i, "tab\there"]) } }
    c.exec("SELECT count(*), max(b) FROM #{COPY_TABLE} WHERE a >= 2000").values.first
  end
  c.close
  [r.transform_values { |v| compared(v) }, r]
end

step('pgSingleRowMode') do
  c = connect
  c.send_query('SELECT g, repeat(\'x\', 100) FROM generate_series(1, 5000) g')
  c.set_single_row_mode
  rows = 0
  sum = 0
  statuses = Hash.new(0)
  while (res = c.get_result)
    statuses[res.res_status(res.result_status)] += 1
    res.check
    res.each_row { |row| rows += 1; sum += row[0].to_i }
    res.clear
  end
  c.send_query('SELECT g, 1 / (5000 - g) FROM generate_series(1, 5000) g')
  c.set_single_row_mode
  failed = outcome do
    n = 0
    while (res = c.get_result)
      res.check
      n += res.ntuples
    end
    n
  end
  nxt = outcome { c.exec('SELECT 42').getvalue(0, 0) }
  c.close
  [{ rows: rows, sum: sum, statuses: statuses, failing: compared(failed), next: nxt }]
end

step('pgPipeline') do
  c = connect
  unless c.respond_to?(:enter_pipeline_mode)
    c.close
    next [{ supported: false }]
  end
  seen = []
  collect = lambda do
    loop do
      res = c.get_result
      if res.nil?
        seen << 'end'
        next
      end
      status = res.res_status(res.result_status)
      seen << (res.result_status == PG::PGRES_FATAL_ERROR ? "#{status} #{res.error_field(PG::Result::PG_DIAG_SQLSTATE)}" : "#{status} #{res.ntuples.positive? ? res.getvalue(0, 0) : ''}".strip)
      break if res.result_status == PG::PGRES_PIPELINE_SYNC
    end
  end
  c.enter_pipeline_mode
  c.send_query_params('SELECT $1::int + 1', [1])
  c.send_prepare('rb_pipe', 'SELECT $1::text || \'!\'')
  c.send_query_prepared('rb_pipe', ['a'])
  c.send_query_params('SELECT 1 / $1::int', [0])
  c.send_query_params('SELECT 3', [])
  c.pipeline_sync
  c.send_query_prepared('rb_pipe', ['b'])
  c.send_query_params("SELECT count(*) FROM #{ITEMS} WHERE k <= $1", [10])
  c.pipeline_sync
  collect.call
  collect.call
  c.exit_pipeline_mode
  again = outcome { c.exec_prepared('rb_pipe', ['c']).getvalue(0, 0) }
  in_tx = outcome do
    c.exec('BEGIN')
    c.enter_pipeline_mode
    c.send_query_params("INSERT INTO #{COPY_TABLE} (a, b) VALUES ($1, 'p')", [7777])
    c.send_query_params("SELECT count(*) FROM #{COPY_TABLE} WHERE a = $1", [7777])
    c.pipeline_sync
    out = []
    loop do
      res = c.get_result
      next if res.nil?
      break if res.result_status == PG::PGRES_PIPELINE_SYNC
      out << res.res_status(res.result_status)
    end
    c.exit_pipeline_mode
    c.exec('ROLLBACK')
    out + [c.exec("SELECT count(*) FROM #{COPY_TABLE} WHERE a = 7777").getvalue(0, 0)]
  end
  c.close
  [{ supported: true, results: seen, preparedAfter: compared(again), inTransaction: compared(in_tx) }]
end

# Clients taking turns, each preparing the same statement name in pipeline
# mode with its own text and running it in later pipelines, every other one
# in a transaction.
step('pgPipelineTakingTurns') do
  tally = Tally.new
  concurrently(CLIENTS) do |i|
    c = connect
    next unless c.respond_to?(:enter_pipeline_mode)

    drain = lambda do
      values = []
      loop do
        res = c.get_result
        next if res.nil?
        break if res.result_status == PG::PGRES_PIPELINE_SYNC

        res.check
        values << res.getvalue(0, 0) if res.ntuples.positive?
      end
      values
    end
    c.enter_pipeline_mode
    c.send_prepare('rb_pipe_turns', "SELECT $1::int + #{i * 1000}")
    c.pipeline_sync
    tally.check([]) { drain.call }
    10.times do |round|
      tally.check([(round + i * 1000).to_s, (round + 1 + i * 1000).to_s]) do
        c.send_query_params('BEGIN', []) if round.odd?
        c.send_query_prepared('rb_pipe_turns', [round])
        c.send_query_prepared('rb_pipe_turns', [round + 1])
        c.send_query_params('COMMIT', []) if round.odd?
        c.pipeline_sync
        drain.call
      end
    end
    c.exit_pipeline_mode
    c.close
  end
  [tally.compare, tally.detail]
end

# A client that goes away inside a transaction (its socket closed, as a
# killed process's is), holding a row lock and a session advisory lock: the
# next client gets both, and sees nothing of the transaction.
step('clientGoneInTransaction') do
  key = 43_000 + SUFFIX.hash.abs % 1000
  a = connect
  a.exec('BEGIN')
  a.exec("INSERT INTO #{ITEMS} (k, name) VALUES (3000, 'gone')")
  a.exec("SELECT * FROM #{ITEMS} WHERE k = 4 FOR UPDATE")
  a.exec("SELECT pg_advisory_lock(#{key})")
  socket = Socket.for_fd(a.socket)
  socket.autoclose = false # libpq's descriptor: shut down, not closed under it
  socket.shutdown(Socket::SHUT_RDWR)
  b = connect
  deadline = Time.now + 3
  row_lock = nil
  advisory = nil
  until Time.now > deadline
    row_lock = outcome { b.transaction { b.exec("SELECT k FROM #{ITEMS} WHERE k = 4 FOR UPDATE NOWAIT").getvalue(0, 0) } }
    advisory = outcome { b.exec("SELECT pg_try_advisory_lock(#{key})").getvalue(0, 0) }
    break if row_lock['value'] && advisory['value'] == 't'

    sleep 0.05
  end
  inserted = outcome { b.exec("SELECT count(*) FROM #{ITEMS} WHERE k = 3000").getvalue(0, 0) }
  b.exec("SELECT pg_advisory_unlock_all()")
  b.close
  begin
    a.close
  rescue StandardError
    nil
  end
  [{ rowLock: compared(row_lock), advisoryLock: compared(advisory), inserted: compared(inserted) }]
end

# Clients that go away at the worst moments: inside a COPY FROM STDIN with
# rows sent and no CopyDone, and with a statement still running. Every other
# client afterwards (4 of them, each several times: in transaction mode they
# get the server connections those clients had) gets its own answers, and
# nothing of the COPY is left.
step('clientGoneMidCopyOrQuery') do
  shut = lambda do |c|
    socket = Socket.for_fd(c.socket)
    socket.autoclose = false
    socket.shutdown(Socket::SHUT_RDWR)
  end
  copying = connect
  copying.exec("COPY #{COPY_TABLE} (a, b) FROM STDIN")
  100.times { |i| copying.put_copy_data("#{10_000 + i}\tgone\n") }
  copying.flush
  shut.call(copying)
  running = connect
  running.send_query("SELECT 'late', pg_sleep(0.5)")
  running.flush
  shut.call(running)
  tally = Tally.new
  concurrently(CLIENTS) do |i|
    c = connect
    6.times do |round|
      tally.check([["#{i}-#{round}", '1']]) do
        round.odd? ? c.transaction { c.exec_params('SELECT $1::text, 1', ["#{i}-#{round}"]).values } : c.exec_params('SELECT $1::text, 1', ["#{i}-#{round}"]).values
      end
    end
    c.close
  end
  left = outcome { connect.then { |c| c.exec("SELECT count(*) FROM #{COPY_TABLE} WHERE a >= 10000").getvalue(0, 0).tap { c.close } } }
  [tally.compare.merge(copyRowsLeft: compared(left)), tally.detail]
end

step('pgListenNotify') do
  listener = connect
  notifier = connect
  r = {}
  listener.exec("LISTEN rb_chan_#{SUFFIX}")
  notifier_pid = notifier.backend_pid
  notifier.exec("NOTIFY rb_chan_#{SUFFIX}, 'from other'")
  got = nil
  listener.wait_for_notify(3) { |ch, pid, payload| got = [ch == "rb_chan_#{SUFFIX}", pid, payload] }
  r[:other] = got && got.values_at(0, 2)
  r[:otherPidIsNotifierPid] = got ? got[1] == notifier_pid : nil
  listener.exec("SELECT pg_notify('rb_chan_#{SUFFIX}', 'own')")
  got = nil
  listener.wait_for_notify(3) { |_ch, pid, payload| got = [pid, payload] }
  r[:own] = got&.last
  r[:ownPidIsOwnPid] = got ? got.first == listener.backend_pid : nil
  listener.exec("UNLISTEN rb_chan_#{SUFFIX}")
  notifier.exec("NOTIFY rb_chan_#{SUFFIX}, 'after'")
  r[:afterUnlisten] = listener.wait_for_notify(1)
  listener.close
  notifier.close
  [r]
end

step('pgBackendPid') do
  c = connect
  pids = Array.new(3) { c.exec('SELECT pg_backend_pid()').getvalue(0, 0).to_i == c.backend_pid }
  c.close
  [{ pidIsBackendPid: pids.uniq }]
end

step('pgTypeMaps') do
  c = connect
  c.type_map_for_results = PG::BasicTypeMapForResults.new(c)
  c.type_map_for_queries = PG::BasicTypeMapForQueries.new(c)
  row = c.exec_params("SELECT $1::int + 1, $2::bool, '2024-01-02 03:04:05+00'::timestamptz, ARRAY[1,2,3], 1.5::float8, '{\"a\":1}'::json, $3::text[]",
                      [41, true, %w[x y]]).values.first
  value = row.map { |v| v.is_a?(Time) ? v.utc.iso8601 : v }
  # The type map again, on a connection created after another client's queries.
  d = connect
  d.type_map_for_results = PG::BasicTypeMapForResults.new(d)
  again = d.exec('SELECT 7::int2, 8::int8, true').values.first
  c.close
  d.close
  [{ value: value, again: again }]
end

# --- Sequel ----------------------------------------------------------------

if SEQUEL
  step('sequelPrepared') do
    db = Sequel.connect(adapter: 'postgres', host: T['host'], port: T['port'], user: T['user'], password: T['password'],
                        database: T['dbname'], max_connections: CLIENTS, pool_timeout: 20, connect_timeout: 10)
    items = db[ITEMS.to_sym]
    by_k = items.where(k: :$k).select(:name).prepare(:first, :rb_by_k)
    count_le = items.where { k <= :$k }.prepare(:select, :rb_count_le)
    tally = Tally.new
    concurrently(CLIENTS * 2) do |i|
      15.times do |round|
        k = (i * 5 + round) % 80 + 10
        tally.check(["item#{k}", k]) do
          run = -> { [by_k.call(k: k)[:name], count_le.call(k: k).length] }
          round.odd? ? db.transaction { run.call } : run.call
        end
      end
    end
    steps = {}
    steps[:transactionRollback] = outcome do
      db.transaction(rollback: :always) { items.insert(k: 5000, name: 'x') }
      items.where(k: 5000).count
    end
    steps[:savepoint] = outcome do
      db.transaction do
        items.insert(k: 5001, name: 'y')
        db.transaction(savepoint: true) do
          items.insert(k: 5002, name: 'z')
          raise Sequel::Rollback
        end
      end
      items.where(k: 5000..5002).select_map(:k)
    end
    steps[:unique] = outcome { items.insert(k: 1, name: 'dup') }
    # Database#listen: LISTEN on quoted, mixed-case channels (as ActionCable's
    # adapter does with escape_identifier), wait_for_notify, then UNLISTEN *.
    channel = "RbChan_#{SUFFIX}"
    heard = []
    listener = Thread.new do
      db.listen([channel, "#{channel}_other"], timeout: 2, loop: false, after_listen: proc { heard << :listening }) { |ch, _pid, payload| heard << [ch == channel, payload] }
    end
    sleep 0.05 until heard.include?(:listening) || !listener.alive?
    db.notify(channel, payload: 'hello Sequel')
    listener.join
    steps[:listen] = { value: heard - [:listening] }
    steps[:afterListen] = outcome { db.synchronize { |c| c.exec('SELECT count(*) FROM pg_listening_channels()').getvalue(0, 0) } }
    db.disconnect
    [tally.compare.merge(steps.transform_values { |v| compared(v) }), tally.detail.merge(steps)]
  end
end

# A schema per tenant, as multi-tenant Rails applications switch them (the
# last step: through PgBouncer the search_path it sets stays on server
# connections other steps would get): each
# tenant's schema has tables of the same names, `things.v` of another type in
# each. ActiveRecord clients set `schema_search_path` (a session SET
# search_path) and run prepared finders; pg clients use SET LOCAL search_path
# in each transaction and statements prepared under it. Every client reads
# its own tenant's rows, with its own column types.
step('schemaPerTenant') do
  schemas = ["rb_ta_#{SUFFIX}", "rb_tb_#{SUFFIX}"]
  ddl = connect
  ddl.exec('SET client_min_messages = warning')
  schemas.each_with_index do |schema, n|
    ddl.exec("DROP SCHEMA IF EXISTS #{schema} CASCADE")
    ddl.exec("CREATE SCHEMA #{schema}")
    ddl.exec("CREATE TABLE #{schema}.items (id int PRIMARY KEY, name text)")
    ddl.exec("INSERT INTO #{schema}.items SELECT g, 'tenant#{n}-' || g FROM generate_series(1, 20) g")
    ddl.exec("CREATE TABLE #{schema}.things (id int PRIMARY KEY, v #{n.zero? ? 'text' : 'int'})")
    ddl.exec("INSERT INTO #{schema}.things SELECT g, g * #{n + 1} FROM generate_series(1, 20) g")
  end
  tenant_item = Class.new(ActiveRecord::Base) { self.table_name = 'items' }
  thing = Class.new(ActiveRecord::Base) { self.table_name = 'things' }
  ar = Tally.new
  ActiveRecord::Base.connection_pool.release_connection
  concurrently(CLIENTS) do |i|
    ActiveRecord::Base.connection_pool.with_connection do |c|
      8.times do |round|
        n = (i + round) % 2 # each client switches tenant every request
        c.schema_search_path = schemas[n]
        id = round + 1
        ar.check(["tenant#{n}-#{id}", n.zero? ? (id * 1).to_s : id * 2]) do
          run = -> { [tenant_item.where(id: id).pick(:name), c.select_value("SELECT v FROM things WHERE id = #{id}")] }
          round.odd? ? tenant_item.transaction { run.call } : run.call
        end
      end
      c.schema_search_path = 'public'
    end
  end
  local = Tally.new
  concurrently(CLIENTS) do |i|
    c = connect
    n = i % 2
    c.transaction do
      c.exec("SET LOCAL search_path TO #{schemas[n]}")
      c.prepare('rb_tenant_items', 'SELECT name FROM items WHERE id = $1')
      c.prepare('rb_tenant_things', 'SELECT v FROM things WHERE id = $1')
    end
    8.times do |round|
      id = round + 1
      local.check(["tenant#{n}-#{id}", (id * (n + 1)).to_s, n.zero? ? 25 : 23]) do
        c.transaction do
          c.exec("SET LOCAL search_path TO #{schemas[n]}")
          things = c.exec_prepared('rb_tenant_things', [id])
          [c.exec_prepared('rb_tenant_items', [id]).getvalue(0, 0), things.getvalue(0, 0), things.ftype(0)]
        end
      end
    end
    c.close
  end
  schemas.each { |schema| ddl.exec("DROP SCHEMA #{schema} CASCADE") }
  ddl.close
  [{ activeRecord: ar.compare, setLocal: local.compare }, { activeRecord: ar.detail, setLocal: local.detail }]
end

begin
  c = connect
  c.exec("DROP TABLE IF EXISTS #{ITEMS}, #{COPY_TABLE}")
  c.close
rescue StandardError => e
  warn "cleanup: #{e.message}"
end
begin
  ActiveRecord::Base.connection_pool.disconnect!
rescue StandardError => e
  warn "disconnect: #{e.message}"
end
puts JSON.generate(RESULT)
