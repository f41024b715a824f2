// pgjdbc under faults, run by test/integration/driver-faults.test.ts with Debian's
// /usr/share/java/postgresql.jar on the class path (see fault_load.py for the protocol:
// "fault" and "stop" lines on stdin, {"ready":true}, then one JSON result line).
// Usage: FaultLoad <jdbc url> <user> <password> <run> <workers>
// pgjdbc has no pool of its own: each worker keeps a connection as a pool would hand it
// out, checks it with isValid() before use and replaces it after an error (HikariCP's
// eviction of a broken connection).
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.io.BufferedReader;
import java.io.InputStreamReader;

public class FaultLoad {
  static volatile boolean fault = false;
  static volatile boolean stopping = false;
  static final Object lock = new Object();
  static int committed = 0;
  static int commitUnknown = 0;
  static boolean ready = false;
  static final Map<List<String>, Integer> errors = new LinkedHashMap<>();
  // Per worker: its transaction's read was answered; that transaction ran when "fault" came.
  static boolean[] readAnswered;
  static boolean[] ranAtFault;
  static int atFault = 0;
  static final List<String> atFaultFailed = new ArrayList<>();

  static void markFault() {
    synchronized (lock) {
      fault = true;
      for (int i = 0; i < readAnswered.length; i++) ranAtFault[i] = readAnswered[i];
    }
    System.out.println("{\"fault\":true}");
    System.out.flush();
  }

  static void end(int worker, Exception e) {
    synchronized (lock) {
      if (ranAtFault[worker]) {
        atFault++;
        if (e != null && atFaultFailed.size() < 20) atFaultFailed.add(describe(e));
      }
      readAnswered[worker] = false;
      ranAtFault[worker] = false;
    }
  }

  /** The SQLSTATE (or the exception's class) and the first line of its message, at most 200 characters. */
  static String[] stateAndText(Exception e) {
    String state = e instanceof SQLException && ((SQLException) e).getSQLState() != null ? ((SQLException) e).getSQLState() : e.getClass().getSimpleName();
    String text = String.valueOf(e.getMessage()).split("\n")[0];
    return new String[] { state, text.length() > 200 ? text.substring(0, 200) : text };
  }

  static String describe(Exception e) {
    String[] st = stateAndText(e);
    return st[0] + " " + st[1];
  }

  static void error(String stage, Exception e) {
    String[] st = stateAndText(e);
    String state = st[0];
    String text = st[1];
    List<String> key = List.of(fault ? "after" : "before", stage, state, text);
    synchronized (lock) {
      errors.merge(key, 1, Integer::sum);
      if (stage.equals("commit")) commitUnknown++;
    }
  }

  public static void main(String[] args) throws Exception {
    String url = args[0];
    Properties props = new Properties();
    props.setProperty("user", args[1]);
    props.setProperty("password", args[2]);
    props.setProperty("ApplicationName", "fault-pgjdbc");
    props.setProperty("connectTimeout", "10");
    String run = args[3];
    int workers = Integer.parseInt(args[4]);
    readAnswered = new boolean[workers];
    ranAtFault = new boolean[workers];
    Thread commands = new Thread(() -> {
      try (BufferedReader in = new BufferedReader(new InputStreamReader(System.in))) {
        String line;
        while ((line = in.readLine()) != null) {
          if (line.trim().equals("fault")) markFault();
          else if (line.trim().equals("stop")) break;
        }
      } catch (Exception ignored) {
        // EOF or a closed stdin: stop as well
      }
      stopping = true;
    });
    commands.setDaemon(true);
    commands.start();
    List<Thread> threads = new ArrayList<>();
    for (int w = 0; w < workers; w++) {
      final int worker = w;
      Thread t = new Thread(() -> {
        Connection conn = null;
        int seq = 0;
        while (!stopping) {
          seq++;
          String stage = "new";
          try {
            if (conn != null && !conn.isValid(5)) {
              try { conn.close(); } catch (SQLException ignored) { /* already broken */ }
              conn = null;
            }
            if (conn == null) {
              conn = DriverManager.getConnection(url, props);
              conn.setAutoCommit(false);
            }
            try (PreparedStatement read = conn.prepareStatement("SELECT count(*) FROM drv_fault WHERE run = ? AND worker = ?")) {
              read.setString(1, run);
              read.setInt(2, worker);
              try (ResultSet rs = read.executeQuery()) { rs.next(); }
            }
            stage = "inflight";
            synchronized (lock) { readAnswered[worker] = true; }
            try (PreparedStatement write = conn.prepareStatement("INSERT INTO drv_fault (run, worker, seq) SELECT ?, ?, ? FROM pg_sleep(0.02)")) {
              write.setString(1, run);
              write.setInt(2, worker);
              write.setInt(3, seq);
              write.executeUpdate();
            }
            stage = "commit";
            conn.commit();
            end(worker, null);
            synchronized (lock) {
              committed++;
              if (!ready) {
                ready = true;
                System.out.println("{\"ready\":true}");
                System.out.flush();
              }
            }
          } catch (Exception e) {
            end(worker, e);
            error(stage, e);
            if (conn != null) {
              try { conn.close(); } catch (SQLException ignored) { /* already broken */ }
              conn = null;
            }
            try { Thread.sleep(50); } catch (InterruptedException ignored) { /* stop */ }
          }
        }
        if (conn != null) try { conn.close(); } catch (SQLException ignored) { /* closing */ }
      });
      threads.add(t);
      t.start();
    }
    for (Thread t : threads) t.join();
    List<String> list = new ArrayList<>();
    for (Map.Entry<List<String>, Integer> e : errors.entrySet()) {
      List<String> k = e.getKey();
      list.add("{\"when\":" + JsonText.quote(k.get(0)) + ",\"stage\":" + JsonText.quote(k.get(1)) + ",\"sqlstate\":" + JsonText.quote(k.get(2)) + ",\"message\":" + JsonText.quote(k.get(3)) + ",\"count\":" + e.getValue() + "}");
    }
    Package pkg = org.postgresql.Driver.class.getPackage();
    String version = pkg.getImplementationVersion() == null ? org.postgresql.util.DriverInfo.DRIVER_VERSION : pkg.getImplementationVersion();
    System.out.println("{\"driver\":\"pgjdbc\",\"version\":" + JsonText.quote(version) + ",\"pool\":\"a connection per worker, isValid() before use, replaced after an error\",\"committed\":" + committed + ",\"commitUnknown\":" + commitUnknown + ",\"atFault\":" + atFault + ",\"atFaultFailed\":[" + String.join(",", atFaultFailed.stream().map(JsonText::quote).toList()) + "],\"errors\":[" + String.join(",", list) + "]}");
    System.out.flush();
    System.exit(0);
  }
}
