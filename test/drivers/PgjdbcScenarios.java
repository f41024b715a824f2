// pgjdbc scenarios, run by test/integration/drivers.test.ts with Debian's
// /usr/share/java/postgresql.jar on the class path and -Duser.timezone=Asia/Tokyo
// (pgjdbc sends the JVM's zone as the TimeZone startup parameter).
// Usage: PgjdbcScenarios <jdbc url> <user> <password> <suffix> <threads> <connections>; prints one JSON object.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicInteger;

public class PgjdbcScenarios {
  static String url;
  static Properties props = new Properties();

  static Connection connect() throws SQLException {
    return DriverManager.getConnection(url, props);
  }

  static String json(Object o) {
    if (o == null) return "null";
    if (o instanceof String) return JsonText.quote((String) o);
    if (o instanceof Number || o instanceof Boolean) return o.toString();
    if (o instanceof Map) {
      List<String> parts = new ArrayList<>();
      for (Map.Entry<?, ?> e : ((Map<?, ?>) o).entrySet()) parts.add(JsonText.quote(e.getKey().toString()) + ":" + json(e.getValue()));
      return "{" + String.join(",", parts) + "}";
    }
    if (o instanceof List) {
      List<String> parts = new ArrayList<>();
      for (Object v : (List<?>) o) parts.add(json(v));
      return "[" + String.join(",", parts) + "]";
    }
    return JsonText.quote(o.toString());
  }

  static String describe(Exception e) {
    String state = e instanceof SQLException ? ((SQLException) e).getSQLState() : null;
    String text = String.valueOf(e.getMessage()).split("\n")[0];
    return (state == null ? e.getClass().getSimpleName() : state) + " " + text;
  }

  /** Threads with their own connections reuse PreparedStatements past prepareThreshold (5): server-side named statements. */
  static Map<String, Object> prepared(int threads, int iterations) throws InterruptedException {
    AtomicInteger executions = new AtomicInteger();
    AtomicInteger failed = new AtomicInteger();
    Map<String, Integer> errors = new ConcurrentHashMap<>();
    List<Thread> workers = new ArrayList<>();
    for (int t = 0; t < threads; t++) {
      final int k = t;
      Thread w = new Thread(() -> {
        try (Connection c = connect()) {
          PreparedStatement reused = c.prepareStatement("SELECT ?::int + 1");
          for (int i = 0; i < iterations; i++) {
            try {
              boolean tx = i % 5 == 0;
              if (tx) c.setAutoCommit(false);
              reused.setInt(1, i);
              try (ResultSet rs = reused.executeQuery()) {
                rs.next();
                if (rs.getInt(1) != i + 1) throw new IllegalStateException("wrong result");
              }
              // A new PreparedStatement for the same text: pgjdbc's statement cache hands back the server statement.
              try (PreparedStatement fresh = c.prepareStatement("SELECT ?::text || ?::text")) {
                fresh.setString(1, "j");
                fresh.setString(2, Integer.toString(k));
                try (ResultSet rs = fresh.executeQuery()) {
                  rs.next();
                  if (!rs.getString(1).equals("j" + k)) throw new IllegalStateException("wrong result");
                }
              }
              if (tx) {
                c.commit();
                c.setAutoCommit(true);
              }
              executions.incrementAndGet();
            } catch (Exception e) {
              failed.incrementAndGet();
              executions.incrementAndGet();
              errors.merge(describe(e), 1, Integer::sum);
              try {
                if (!c.getAutoCommit()) {
                  c.rollback();
                  c.setAutoCommit(true);
                }
              } catch (SQLException ignored) {
                // the next iteration reports it
              }
            }
          }
        } catch (Exception e) {
          failed.addAndGet(iterations);
          errors.merge(describe(e), iterations, Integer::sum);
        }
      });
      workers.add(w);
      w.start();
    }
    for (Thread w : workers) w.join();
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("executions", executions.get());
    out.put("failed", failed.get());
    Map<String, Object> top = new LinkedHashMap<>();
    errors.entrySet().stream().sorted((a, b) -> b.getValue() - a.getValue()).limit(3).forEach(e -> top.put(e.getKey(), e.getValue()));
    out.put("errors", top);
    return out;
  }

  static Map<String, Object> batch(String suffix) {
    Map<String, Object> out = new LinkedHashMap<>();
    String table = "drv_jdbc_batch_" + suffix;
    try (Connection c = connect(); Statement s = c.createStatement()) {
      s.execute("CREATE TABLE " + table + " (id int, label text)");
      try {
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + table + " VALUES (?, ?)")) {
          for (int i = 0; i < 1000; i++) {
            ps.setInt(1, i);
            ps.setString(2, "row" + i);
            ps.addBatch();
          }
          int[] counts = ps.executeBatch();
          out.put("batchCounts", counts.length);
        }
        try (ResultSet rs = s.executeQuery("SELECT count(*), sum(id) FROM " + table)) {
          rs.next();
          out.put("rows", rs.getInt(1));
          out.put("sum", rs.getLong(2));
        }
      } finally {
        s.execute("DROP TABLE " + table);
      }
    } catch (Exception e) {
      out.put("error", describe(e));
    }
    return out;
  }

  static Map<String, Object> timeZone() {
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("jvmZone", java.util.TimeZone.getDefault().getID());
    try (Connection c = connect(); Statement s = c.createStatement()) {
      List<String> zones = new ArrayList<>();
      for (int i = 0; i < 3; i++) {
        try (ResultSet rs = s.executeQuery("SHOW TimeZone")) {
          rs.next();
          if (!zones.contains(rs.getString(1))) zones.add(rs.getString(1));
        }
      }
      out.put("showTimeZone", zones);
      // A literal without an offset is read in the session's TimeZone.
      try (ResultSet rs = s.executeQuery("SELECT '2024-01-01 00:00:00'::timestamptz")) {
        rs.next();
        out.put("epochMillis", rs.getTimestamp(1).getTime());
      }
    } catch (Exception e) {
      out.put("error", describe(e));
    }
    return out;
  }

  static Map<String, Object> serverVersion() {
    Map<String, Object> out = new LinkedHashMap<>();
    try (Connection c = connect(); Statement s = c.createStatement()) {
      out.put("productVersion", c.getMetaData().getDatabaseProductVersion());
      out.put("majorVersion", c.getMetaData().getDatabaseMajorVersion());
      try (ResultSet rs = s.executeQuery("SHOW server_version")) {
        rs.next();
        out.put("showServerVersion", rs.getString(1));
      }
    } catch (Exception e) {
      out.put("error", describe(e));
    }
    return out;
  }

  /**
   * More default connections open at once than the pool has server
   * connections: pgjdbc sends SET extra_float_digits and SET application_name
   * after each login, and a transaction pooler that pinned on them would
   * starve the rest. Each connection then reads both settings twice.
   */
  static Map<String, Object> manyConnections(int count) throws InterruptedException {
    List<Connection> open = new ArrayList<>();
    Map<String, Object> out = new LinkedHashMap<>();
    List<String> errors = new ArrayList<>();
    Map<String, Integer> seen = new ConcurrentHashMap<>();
    AtomicInteger failed = new AtomicInteger();
    List<Thread> threads = new ArrayList<>();
    for (int i = 0; i < count; i++) {
      Thread t = new Thread(() -> {
        try {
          Connection c = connect();
          synchronized (open) {
            open.add(c);
          }
          for (int round = 0; round < 2; round++) {
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT current_setting('extra_float_digits') || '/' || current_setting('application_name')")) {
              rs.next();
              seen.merge(rs.getString(1), 1, Integer::sum);
            }
            Thread.sleep(100);
          }
        } catch (Exception e) {
          failed.incrementAndGet();
          synchronized (errors) {
            if (errors.size() < 3) errors.add(describe(e));
          }
        }
      });
      threads.add(t);
      t.start();
    }
    for (Thread t : threads) t.join();
    for (Connection c : open) {
      try {
        c.close();
      } catch (SQLException e) {
        // closing is not what is measured
      }
    }
    out.put("connections", count);
    out.put("failed", failed.get());
    out.put("seen", new LinkedHashMap<>(seen));
    out.put("errors", errors);
    return out;
  }

  public static void main(String[] args) throws Exception {
    url = args[0];
    props.setProperty("user", args[1]);
    props.setProperty("password", args[2]);
    props.setProperty("connectTimeout", "10");
    String suffix = args[3];
    int threads = Integer.parseInt(args[4]);
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("prepared", prepared(threads, 40));
    out.put("batch", batch(suffix));
    out.put("timeZone", timeZone());
    out.put("serverVersion", serverVersion());
    out.put("manyConnections", manyConnections(Integer.parseInt(args[5])));
    System.out.println(json(out));
  }
}
