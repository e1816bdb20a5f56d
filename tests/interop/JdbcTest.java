// pgtether interop: pgjdbc with prepareThreshold=1, so every PreparedStatement is a named
// server-side statement (S_1, S_2, ...) from its first execution and is then reused.
//
// Usage: java -cp /usr/share/java/postgresql.jar JdbcTest.java PORT
//        (user app, password app, database app, host 127.0.0.1)
//
// Phase 1: 50 concurrent clients, 20 transactions each, prepared statements reused over and
// over, each client with its own SET values (application_name, search_path, myapp.client, later
// statement_timeout then RESET) that it must keep seeing, never another client's.
// Phase 2, with a few background clients churning the pool: LISTEN/NOTIFY, a temp table, a
// session advisory lock, a WITH HOLD cursor and an SQL-level PREPARE, each used across
// transactions by the client that made it.
//
// Exits 0 when everything held, 1 with one line per problem otherwise (3 on a watchdog timeout).

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicBoolean;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public class JdbcTest {
    static final String DRIVER = "pgjdbc";
    static final String TABLE = "interop_jdbc";
    static final String CHANNEL = "interop_jdbc_chan";
    static final long LOCK_KEY = 7104;
    static final int CLIENTS = 50;
    static final int TXNS = 20;
    static final int WATCHDOG_SECONDS = 100;

    static int port;
    static final ConcurrentLinkedQueue<String> failures = new ConcurrentLinkedQueue<>();

    static class Mismatch extends RuntimeException {
        Mismatch(String msg) {
            super(msg);
        }
    }

    static void expect(boolean cond, String msg) {
        if (!cond) {
            throw new Mismatch(msg);
        }
    }

    /** Exception class and the first line of its message. */
    static String describe(Throwable e) {
        String msg = e.getMessage() == null ? "" : e.getMessage().trim().split("\n")[0];
        return e.getClass().getSimpleName() + ": " + msg;
    }

    static Connection connect() throws SQLException {
        return connect(1);
    }

    /** prepareThreshold 0 (unnamed statements only) is for setting up and the row count check. */
    static Connection connect(int prepareThreshold) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", "app");
        props.setProperty("password", "app");
        props.setProperty("prepareThreshold", String.valueOf(prepareThreshold));
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "60");
        return DriverManager.getConnection("jdbc:postgresql://127.0.0.1:" + port + "/app", props);
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
        }
    }

    /** First column of the only row of a query run through `ps` (already bound). */
    static String one(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            expect(rs.next(), "no row from a prepared statement");
            return rs.getString(1);
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            return one(ps);
        }
    }

    static int backendPid(Connection c) throws SQLException {
        return Integer.parseInt(one(c, "SELECT pg_backend_pid()"));
    }

    static final String STATE_SQL =
            "SELECT current_setting('myapp.client'), current_setting('application_name'), "
                    + "current_setting('search_path'), current_setting('statement_timeout')";

    static void client(int i) {
        String where = "session setup";
        try (Connection c = connect()) {
            String defaultTimeout = one(c, "SHOW statement_timeout");
            exec(c, "SET application_name = 'c" + i + "'");
            exec(c, "SET search_path = sp_c" + i + ", public");
            exec(c, "SET myapp.client = '" + i + "'");
            String ownTimeout = (100001 + i) + "ms";
            // Prepared once per connection, executed every transaction: named statements reused.
            PreparedStatement add = c.prepareStatement("SELECT ?::int + ?::int");
            PreparedStatement state = c.prepareStatement(STATE_SQL);
            PreparedStatement show = c.prepareStatement("SHOW application_name");
            PreparedStatement ins = c.prepareStatement("INSERT INTO " + TABLE + " (client, seq) VALUES (?, ?)");
            PreparedStatement count = c.prepareStatement("SELECT count(*) FROM " + TABLE + " WHERE client = ?");
            PreparedStatement concat = c.prepareStatement("SELECT ?::text || ':' || ?::int");
            PreparedStatement own = c.prepareStatement("SELECT current_setting('myapp.client')");
            PreparedStatement div = c.prepareStatement("SELECT 1 / ?::int");
            for (int k = 0; k < TXNS; k++) {
                where = "transaction " + k;
                String timeout = (k >= 10 && k < 15) ? ownTimeout : defaultTimeout;
                c.setAutoCommit(false);
                try {
                    add.setInt(1, i);
                    add.setInt(2, k);
                    String sum = one(add);
                    expect(sum.equals(String.valueOf(i + k)), i + " + " + k + " gave " + sum);
                    List<String> got = new ArrayList<>();
                    try (ResultSet rs = state.executeQuery()) {
                        expect(rs.next(), "no row from the state query");
                        for (int col = 1; col <= 4; col++) {
                            got.add(rs.getString(col));
                        }
                    }
                    List<String> want = Arrays.asList(String.valueOf(i), "c" + i, "sp_c" + i + ", public", timeout);
                    expect(got.equals(want), "session state (myapp.client, application_name, search_path, "
                            + "statement_timeout) is " + got + ", expected " + want
                            + " (a SET leaked between clients or was lost)");
                    String app = one(show);
                    expect(app.equals("c" + i), "SHOW application_name is '" + app + "', expected 'c" + i + "'");
                    ins.setInt(1, i);
                    ins.setInt(2, k);
                    ins.executeUpdate();
                    count.setInt(1, i);
                    String n = one(count);
                    expect(n.equals(String.valueOf(k + 1)), "own row count is " + n + ", expected " + (k + 1));
                    concat.setString(1, "c" + i);
                    concat.setInt(2, k);
                    String s = one(concat);
                    expect(s.equals("c" + i + ":" + k), "concatenation gave '" + s + "'");
                    c.commit();
                } catch (RuntimeException | SQLException e) {
                    c.rollback();
                    throw e;
                } finally {
                    c.setAutoCommit(true);
                }
                if (k == 5) {
                    where = "SET LOCAL transaction";
                    c.setAutoCommit(false);
                    exec(c, "SET LOCAL myapp.client = 'local'");
                    String inside = one(own);
                    c.commit();
                    c.setAutoCommit(true);
                    expect(inside.equals("local"), "SET LOCAL not seen inside its transaction: '" + inside + "'");
                    String after = one(own);
                    expect(after.equals(String.valueOf(i)), "SET LOCAL outlived its transaction: '" + after + "'");
                } else if (k == 8) {
                    where = "rolled-back transaction";
                    c.setAutoCommit(false);
                    exec(c, "SET myapp.client = 'rolledback'");
                    String state8 = null;
                    try {
                        div.setInt(1, 0);
                        one(div);
                    } catch (SQLException e) {
                        state8 = e.getSQLState();
                    }
                    c.rollback();
                    c.setAutoCommit(true);
                    expect("22012".equals(state8), "1 / 0 did not fail with division_by_zero: " + state8);
                    String after = one(own);
                    expect(after.equals(String.valueOf(i)), "SET in a rolled-back transaction stuck: '" + after + "'");
                } else if (k == 9) {
                    exec(c, "SET statement_timeout = '" + ownTimeout + "'");
                } else if (k == 14) {
                    exec(c, "RESET statement_timeout");
                }
            }
        } catch (Throwable e) {
            failures.add("client " + i + " (" + where + "): " + describe(e));
        }
    }

    /** Background traffic so that an unpinned client would land on other server connections. */
    static void churn(int n, AtomicBoolean stop) {
        try (Connection c = connect()) {
            exec(c, "SET myapp.client = 'churn" + n + "'");
            PreparedStatement dbl = c.prepareStatement("SELECT ?::int * 2");
            PreparedStatement own = c.prepareStatement("SELECT current_setting('myapp.client')");
            int x = 0;
            while (!stop.get()) {
                x++;
                c.setAutoCommit(false);
                dbl.setInt(1, x);
                String got = one(dbl);
                String v = one(own);
                c.commit();
                c.setAutoCommit(true);
                expect(got.equals(String.valueOf(2 * x)), x + " * 2 gave " + got);
                expect(v.equals("churn" + n), "churn client " + n + " sees myapp.client = '" + v + "'");
                Thread.sleep(5);
            }
        } catch (Throwable e) {
            failures.add("churn client " + n + ": " + describe(e));
        }
    }

    static void scenarioListen() throws Exception {
        try (Connection lis = connect(); Connection ntf = connect()) {
            exec(lis, "LISTEN " + CHANNEL);
            int pid = backendPid(lis);
            PGConnection pgLis = lis.unwrap(PGConnection.class);
            PreparedStatement notify = ntf.prepareStatement("SELECT pg_notify(?, ?)");
            for (int r = 0; r < 3; r++) {
                String payload = "m" + r;
                notify.setString(1, CHANNEL);
                notify.setString(2, payload);
                one(notify);
                PGNotification[] got = pgLis.getNotifications(10000);
                expect(got != null && got.length > 0,
                        "notification '" + payload + "' not delivered to the listener within 10 s");
                expect(got[0].getName().equals(CHANNEL) && got[0].getParameter().equals(payload),
                        "listener got (" + got[0].getName() + ", " + got[0].getParameter() + "), expected '" + payload + "'");
                expect(backendPid(lis) == pid, "listener moved to another server connection");
            }
            exec(lis, "UNLISTEN " + CHANNEL);
        }
    }

    static void scenarioTempTable() throws Exception {
        try (Connection c = connect()) {
            exec(c, "CREATE TEMP TABLE " + TABLE + "_tmp (x int)");
            int pid = backendPid(c);
            PreparedStatement ins = c.prepareStatement("INSERT INTO " + TABLE + "_tmp VALUES (?)");
            PreparedStatement sum = c.prepareStatement("SELECT sum(x) FROM " + TABLE + "_tmp");
            for (int r = 1; r <= 5; r++) {
                c.setAutoCommit(false);
                ins.setInt(1, r);
                ins.executeUpdate();
                String s = one(sum);
                int samePid = backendPid(c);
                c.commit();
                c.setAutoCommit(true);
                expect(s.equals(String.valueOf(r * (r + 1) / 2)), "temp table sum is " + s + ", expected " + (r * (r + 1) / 2));
                expect(samePid == pid, "temp table owner moved to another server connection");
                Thread.sleep(20);
            }
            exec(c, "DROP TABLE " + TABLE + "_tmp");
        }
    }

    static final String LOCKS_SQL =
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
                    + "AND objid::bigint = ?::bigint AND objsubid = 1 AND granted AND pid = pg_backend_pid()";

    static void scenarioAdvisoryLock() throws Exception {
        try (Connection a = connect(); Connection b = connect()) {
            PreparedStatement lock = a.prepareStatement("SELECT pg_try_advisory_lock(?::bigint)");
            lock.setLong(1, LOCK_KEY);
            expect(one(lock).equals("t"), "advisory lock " + LOCK_KEY + " is already held by another session");
            int pid = backendPid(a);
            PreparedStatement locks = a.prepareStatement(LOCKS_SQL);
            PreparedStatement tryLock = b.prepareStatement("SELECT pg_try_advisory_xact_lock(?::bigint)");
            for (int r = 0; r < 5; r++) {
                a.setAutoCommit(false);
                locks.setLong(1, LOCK_KEY);
                String n = one(locks);
                a.commit();
                a.setAutoCommit(true);
                expect(n.equals("1"), "holder does not see its advisory lock in pg_locks (round " + r + ")");
                b.setAutoCommit(false);
                tryLock.setLong(1, LOCK_KEY);
                String got = one(tryLock);
                b.commit();
                b.setAutoCommit(true);
                expect(got.equals("f"), "another client took the held advisory lock (round " + r + ")");
                expect(backendPid(a) == pid, "lock holder moved to another server connection");
                Thread.sleep(20);
            }
            PreparedStatement unlock = a.prepareStatement("SELECT pg_advisory_unlock(?::bigint)");
            unlock.setLong(1, LOCK_KEY);
            expect(one(unlock).equals("t"), "pg_advisory_unlock by the holder returned false");
            b.setAutoCommit(false);
            tryLock.setLong(1, LOCK_KEY);
            String got = one(tryLock);
            b.commit();
            b.setAutoCommit(true);
            expect(got.equals("t"), "advisory lock still held after the holder released it");
        }
    }

    static void scenarioHoldCursor() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DECLARE " + TABLE + "_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 12) g");
            int pid = backendPid(c);
            PreparedStatement fetch = c.prepareStatement("FETCH 3 FROM " + TABLE + "_cur");
            for (int r = 0; r < 4; r++) {
                c.setAutoCommit(false);
                List<Integer> rows = new ArrayList<>();
                try (ResultSet rs = fetch.executeQuery()) {
                    while (rs.next()) {
                        rows.add(rs.getInt(1));
                    }
                }
                int samePid = backendPid(c);
                c.commit();
                c.setAutoCommit(true);
                List<Integer> want = Arrays.asList(3 * r + 1, 3 * r + 2, 3 * r + 3);
                expect(rows.equals(want), "FETCH from the WITH HOLD cursor gave " + rows + ", expected " + want);
                expect(samePid == pid, "cursor owner moved to another server connection");
                Thread.sleep(20);
            }
            exec(c, "CLOSE " + TABLE + "_cur");
        }
    }

    static void scenarioSqlPrepare() throws Exception {
        try (Connection c = connect()) {
            exec(c, "PREPARE " + TABLE + "_sqlp (int) AS SELECT $1 * 2");
            int pid = backendPid(c);
            for (int r = 1; r <= 5; r++) {
                c.setAutoCommit(false);
                String got = one(c, "EXECUTE " + TABLE + "_sqlp(" + r + ")");
                int samePid = backendPid(c);
                c.commit();
                c.setAutoCommit(true);
                expect(got.equals(String.valueOf(2 * r)), "EXECUTE of an SQL-level prepared statement gave " + got);
                expect(samePid == pid, "PREPARE owner moved to another server connection");
                Thread.sleep(20);
            }
            exec(c, "DEALLOCATE " + TABLE + "_sqlp");
        }
    }

    static void checkRows() throws Exception {
        try (Connection c = connect(0);
             Statement st = c.createStatement();
             ResultSet rs = st.executeQuery("SELECT count(*), count(DISTINCT client) FROM " + TABLE)) {
            expect(rs.next(), "no row from the row count");
            long total = rs.getLong(1);
            long distinct = rs.getLong(2);
            expect(total == CLIENTS * TXNS && distinct == CLIENTS, "table has " + total + " rows from "
                    + distinct + " clients, expected " + (CLIENTS * TXNS) + " from " + CLIENTS);
        }
    }

    static void printFailures() {
        // Scenario and check failures first: the 50 clients' ones are often all alike.
        List<String> ordered = new ArrayList<>(failures);
        ordered.sort(java.util.Comparator.comparing((String p) -> p.startsWith("client ")));
        int shown = 0;
        for (String p : ordered) {
            if (shown++ == 40) {
                System.out.println("  ... and " + (failures.size() - 40) + " more");
                break;
            }
            System.out.println("  - " + p);
        }
    }

    static void reportAndExit() {
        if (failures.isEmpty()) {
            System.out.println(DRIVER + ": OK");
            System.out.flush();
            Runtime.getRuntime().halt(0);
        }
        long prepared = failures.stream().filter(p -> p.contains("prepared statement")).count();
        System.out.println(DRIVER + ": FAILED: " + failures.size() + " problem(s), " + prepared
                + " about prepared statements");
        printFailures();
        System.out.flush();
        Runtime.getRuntime().halt(1);
    }

    interface Scenario {
        void run() throws Exception;
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: java -cp /usr/share/java/postgresql.jar JdbcTest.java PORT");
            System.exit(1);
        }
        port = Integer.parseInt(args[0]);
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(WATCHDOG_SECONDS * 1000L);
            } catch (InterruptedException e) {
                return;
            }
            failures.add("watchdog: the run did not finish within " + WATCHDOG_SECONDS + " s");
            System.out.println(DRIVER + ": TIMEOUT after " + WATCHDOG_SECONDS + " s");
            printFailures();
            System.out.flush();
            Runtime.getRuntime().halt(3);
        });
        watchdog.setDaemon(true);
        watchdog.start();
        long started = System.nanoTime();

        try {
            try (Connection setup = connect(0)) {
                System.out.println(DRIVER + ": connected, server " + setup.getMetaData().getDatabaseProductVersion()
                        + ", driver " + setup.getMetaData().getDriverVersion());
                exec(setup, "DROP TABLE IF EXISTS " + TABLE);
                exec(setup, "CREATE TABLE " + TABLE + " (client int NOT NULL, seq int NOT NULL)");
            }

            List<Thread> threads = new ArrayList<>();
            for (int i = 0; i < CLIENTS; i++) {
                final int id = i;
                threads.add(new Thread(() -> client(id)));
            }
            threads.forEach(Thread::start);
            for (Thread t : threads) {
                t.join();
            }
            System.out.printf("%s: phase 1 (%d clients x %d transactions) done in %.1f s, %d problem(s)%n",
                    DRIVER, CLIENTS, TXNS, (System.nanoTime() - started) / 1e9, failures.size());

            AtomicBoolean stop = new AtomicBoolean(false);
            List<Thread> churners = new ArrayList<>();
            for (int n = 0; n < 3; n++) {
                final int id = n;
                churners.add(new Thread(() -> churn(id, stop)));
            }
            churners.forEach(Thread::start);
            String[] names = {"row count after phase 1", "LISTEN/NOTIFY", "temp table", "session advisory lock", "WITH HOLD cursor", "SQL-level PREPARE"};
            Scenario[] scenarios = {
                JdbcTest::checkRows,
                JdbcTest::scenarioListen,
                JdbcTest::scenarioTempTable,
                JdbcTest::scenarioAdvisoryLock,
                JdbcTest::scenarioHoldCursor,
                JdbcTest::scenarioSqlPrepare,
            };
            for (int s = 0; s < scenarios.length; s++) {
                try {
                    scenarios[s].run();
                    System.out.println(DRIVER + ": " + names[s] + ": ok");
                } catch (Throwable e) {
                    failures.add(names[s] + ": " + describe(e));
                    System.out.println(DRIVER + ": " + names[s] + ": FAILED");
                }
            }
            stop.set(true);
            for (Thread t : churners) {
                t.join();
            }
            System.out.printf("%s: finished in %.1f s%n", DRIVER, (System.nanoTime() - started) / 1e9);
        } catch (Throwable e) {
            failures.add("setup or run: " + describe(e));
        }
        reportAndExit();
    }
}
