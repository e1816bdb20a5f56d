#!/usr/bin/env node
// pgtether interop: node-postgres (`pg`) with named queries ({name, text, values}): each name is
// parsed once per connection and then only bound and executed, so the driver relies on the
// server still having it.
//
// Usage: node node_pg_test.js PORT   (user app, password app, database app, host 127.0.0.1)
//
// Phase 1: 50 concurrent clients, 20 transactions each, named statements reused over and over,
// each client with its own SET values (application_name, search_path, myapp.client, later
// statement_timeout then RESET) that it must keep seeing, never another client's.
// Phase 2, with a few background clients churning the pool: LISTEN/NOTIFY, a temp table, a
// session advisory lock, a WITH HOLD cursor and an SQL-level PREPARE, each used across
// transactions by the client that made it.
//
// Exits 0 when everything held, 1 with one line per problem otherwise (3 on a watchdog timeout).
'use strict';

let pg;
try {
  pg = require('pg');
} catch (e) {
  console.error(`node-postgres is not installed (${e.message}): npm ci --prefix tests/interop`);
  process.exit(1);
}

const DRIVER = 'node-postgres';
const TABLE = 'interop_node';
const CHANNEL = 'interop_node_chan';
const LOCK_KEY = 7103;
const CLIENTS = 50;
const TXNS = 20;
const WATCHDOG_SECONDS = 100;

const PORT = Number(process.argv[2]);
if (!PORT) {
  console.error('usage: node node_pg_test.js PORT');
  process.exit(1);
}

const failures = [];
const fail = (msg) => failures.push(msg);

// Error class and the first line of its message.
const describe = (e) => `${e.constructor.name}: ${String(e.message).trim().split('\n')[0]}`;

class Mismatch extends Error {}
function expect(cond, msg) {
  if (!cond) throw new Mismatch(msg);
}

async function connect() {
  const c = new pg.Client({
    host: '127.0.0.1',
    port: PORT,
    user: 'app',
    password: 'app',
    database: 'app',
    connectionTimeoutMillis: 10000,
    query_timeout: 30000,
  });
  // An error on an idle connection must not crash the process: it is reported by the next query.
  c.on('error', (e) => fail(`connection error event: ${e.message}`));
  await c.connect();
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A named query; `values` optional. Returns the rows (arrays are not used: objects by column).
async function named(c, name, text, values = []) {
  const res = await c.query({ name, text, values });
  return res.rows;
}

async function one(c, name, text, values = []) {
  const rows = await named(c, name, text, values);
  expect(rows.length > 0, `no row from ${text}`);
  return Object.values(rows[0])[0];
}

const backendPid = (c) => one(c, 'pid', 'SELECT pg_backend_pid()');

const STATE_SQL =
  "SELECT current_setting('myapp.client') AS a, current_setting('application_name') AS b, " +
  "current_setting('search_path') AS c, current_setting('statement_timeout') AS d";

async function checkState(c, i, timeout) {
  const [row] = await named(c, 'state', STATE_SQL);
  const got = [row.a, row.b, row.c, row.d];
  const want = [String(i), `c${i}`, `sp_c${i}, public`, timeout];
  expect(
    JSON.stringify(got) === JSON.stringify(want),
    `session state (myapp.client, application_name, search_path, statement_timeout) is ` +
      `${JSON.stringify(got)}, expected ${JSON.stringify(want)} (a SET leaked between clients or was lost)`
  );
  const show = await one(c, 'show_app', 'SHOW application_name');
  expect(show === `c${i}`, `SHOW application_name is '${show}', expected 'c${i}'`);
}

const ownSetting = (c) => one(c, 'own_client', "SELECT current_setting('myapp.client')");

async function client(i) {
  let where = 'session setup';
  let c;
  try {
    c = await connect();
    const defaultTimeout = await one(c, 'show_timeout', 'SHOW statement_timeout');
    await c.query(`SET application_name = 'c${i}'`);
    await c.query(`SET search_path = sp_c${i}, public`);
    await c.query(`SET myapp.client = '${i}'`);
    const ownTimeout = `${100001 + i}ms`;
    for (let k = 0; k < TXNS; k++) {
      where = `transaction ${k}`;
      const timeout = k >= 10 && k < 15 ? ownTimeout : defaultTimeout;
      await c.query('BEGIN');
      try {
        const sum = await one(c, 'add', 'SELECT $1::int + $2::int', [i, k]);
        expect(sum === i + k, `${i} + ${k} gave ${sum}`);
        await checkState(c, i, timeout);
        await named(c, 'ins', `INSERT INTO ${TABLE} (client, seq) VALUES ($1, $2)`, [i, k]);
        const n = await one(c, 'count', `SELECT count(*) FROM ${TABLE} WHERE client = $1`, [i]);
        expect(Number(n) === k + 1, `own row count is ${n}, expected ${k + 1}`);
        const s = await one(c, 'concat', "SELECT $1::text || ':' || $2::int", [`c${i}`, k]);
        expect(s === `c${i}:${k}`, `concatenation gave '${s}'`);
        await c.query('COMMIT');
      } catch (e) {
        await c.query('ROLLBACK').catch(() => {});
        throw e;
      }
      if (k === 5) {
        where = 'SET LOCAL transaction';
        await c.query('BEGIN');
        await c.query("SET LOCAL myapp.client = 'local'");
        const inside = await ownSetting(c);
        await c.query('COMMIT');
        expect(inside === 'local', `SET LOCAL not seen inside its transaction: '${inside}'`);
        const after = await ownSetting(c);
        expect(after === String(i), `SET LOCAL outlived its transaction: '${after}'`);
      } else if (k === 8) {
        where = 'rolled-back transaction';
        await c.query('BEGIN');
        await c.query("SET myapp.client = 'rolledback'");
        let err = null;
        try {
          await named(c, 'div', 'SELECT 1 / $1::int', [0]);
        } catch (e) {
          err = e;
        }
        await c.query('ROLLBACK');
        expect(err && err.code === '22012', `1 / 0 did not fail with division_by_zero: ${err}`);
        const after = await ownSetting(c);
        expect(after === String(i), `SET in a rolled-back transaction stuck: '${after}'`);
      } else if (k === 9) {
        await c.query(`SET statement_timeout = '${ownTimeout}'`);
      } else if (k === 14) {
        await c.query('RESET statement_timeout');
      }
    }
  } catch (e) {
    fail(`client ${i} (${where}): ${describe(e)}`);
  } finally {
    if (c) await c.end().catch(() => {});
  }
}

// Background traffic so that an unpinned client would land on other server connections.
async function churn(n, stop) {
  let c;
  try {
    c = await connect();
    await c.query(`SET myapp.client = 'churn${n}'`);
    let x = 0;
    while (!stop.done) {
      x += 1;
      await c.query('BEGIN');
      const got = await one(c, 'double', 'SELECT $1::int * 2', [x]);
      const v = await ownSetting(c);
      await c.query('COMMIT');
      expect(got === 2 * x, `${x} * 2 gave ${got}`);
      expect(v === `churn${n}`, `churn client ${n} sees myapp.client = '${v}'`);
      await sleep(5);
    }
  } catch (e) {
    fail(`churn client ${n}: ${describe(e)}`);
  } finally {
    if (c) await c.end().catch(() => {});
  }
}

async function inTransaction(c, body) {
  await c.query('BEGIN');
  try {
    const out = await body();
    await c.query('COMMIT');
    return out;
  } catch (e) {
    await c.query('ROLLBACK').catch(() => {});
    throw e;
  }
}

async function scenarioListen() {
  const lis = await connect();
  const ntf = await connect();
  try {
    const received = [];
    let wake = null;
    lis.on('notification', (m) => {
      received.push([m.channel, m.payload]);
      if (wake) wake();
    });
    await lis.query(`LISTEN ${CHANNEL}`);
    const pid = await backendPid(lis);
    for (let r = 0; r < 3; r++) {
      const payload = `m${r}`;
      await one(ntf, 'notify', 'SELECT pg_notify($1, $2)', [CHANNEL, payload]);
      const deadline = Date.now() + 10000;
      while (received.length === 0 && Date.now() < deadline) {
        await new Promise((resolve) => {
          wake = resolve;
          setTimeout(resolve, 100);
        });
      }
      wake = null;
      expect(received.length > 0, `notification '${payload}' not delivered to the listener within 10 s`);
      const got = received.shift();
      expect(
        got[0] === CHANNEL && got[1] === payload,
        `listener got ${JSON.stringify(got)}, expected '${payload}'`
      );
      expect((await backendPid(lis)) === pid, 'listener moved to another server connection');
    }
    await lis.query(`UNLISTEN ${CHANNEL}`);
  } finally {
    await lis.end().catch(() => {});
    await ntf.end().catch(() => {});
  }
}

async function scenarioTempTable() {
  const c = await connect();
  try {
    await c.query(`CREATE TEMP TABLE ${TABLE}_tmp (x int)`);
    const pid = await backendPid(c);
    for (let r = 1; r <= 5; r++) {
      await inTransaction(c, async () => {
        await named(c, 'tmp_ins', `INSERT INTO ${TABLE}_tmp VALUES ($1)`, [r]);
        const s = await one(c, 'tmp_sum', `SELECT sum(x) FROM ${TABLE}_tmp`);
        const want = (r * (r + 1)) / 2;
        expect(Number(s) === want, `temp table sum is ${s}, expected ${want}`);
        expect((await backendPid(c)) === pid, 'temp table owner moved to another server connection');
      });
      await sleep(20);
    }
    await c.query(`DROP TABLE ${TABLE}_tmp`);
  } finally {
    await c.end().catch(() => {});
  }
}

const LOCKS_SQL =
  "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 " +
  'AND objid::bigint = $1::bigint AND objsubid = 1 AND granted AND pid = pg_backend_pid()';

async function scenarioAdvisoryLock() {
  const a = await connect();
  const b = await connect();
  try {
    const took = await one(a, 'lock', 'SELECT pg_try_advisory_lock($1::bigint)', [LOCK_KEY]);
    expect(took === true, `advisory lock ${LOCK_KEY} is already held by another session`);
    const pid = await backendPid(a);
    for (let r = 0; r < 5; r++) {
      const n = await inTransaction(a, () => one(a, 'locks', LOCKS_SQL, [LOCK_KEY]));
      expect(Number(n) === 1, `holder does not see its advisory lock in pg_locks (round ${r})`);
      const got = await inTransaction(b, () =>
        one(b, 'try_lock', 'SELECT pg_try_advisory_xact_lock($1::bigint)', [LOCK_KEY])
      );
      expect(got === false, `another client took the held advisory lock (round ${r})`);
      expect((await backendPid(a)) === pid, 'lock holder moved to another server connection');
      await sleep(20);
    }
    const unlocked = await one(a, 'unlock', 'SELECT pg_advisory_unlock($1::bigint)', [LOCK_KEY]);
    expect(unlocked === true, 'pg_advisory_unlock by the holder returned false');
    const got = await inTransaction(b, () =>
      one(b, 'try_lock', 'SELECT pg_try_advisory_xact_lock($1::bigint)', [LOCK_KEY])
    );
    expect(got === true, 'advisory lock still held after the holder released it');
  } finally {
    await a.end().catch(() => {});
    await b.end().catch(() => {});
  }
}

async function scenarioHoldCursor() {
  const c = await connect();
  try {
    await c.query(
      `DECLARE ${TABLE}_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 12) g`
    );
    const pid = await backendPid(c);
    for (let r = 0; r < 4; r++) {
      await inTransaction(c, async () => {
        const rows = (await named(c, 'fetch', `FETCH 3 FROM ${TABLE}_cur`)).map((row) => row.g);
        const want = [3 * r + 1, 3 * r + 2, 3 * r + 3];
        expect(
          JSON.stringify(rows) === JSON.stringify(want),
          `FETCH from the WITH HOLD cursor gave ${JSON.stringify(rows)}, expected ${JSON.stringify(want)}`
        );
        expect((await backendPid(c)) === pid, 'cursor owner moved to another server connection');
      });
      await sleep(20);
    }
    await c.query(`CLOSE ${TABLE}_cur`);
  } finally {
    await c.end().catch(() => {});
  }
}

async function scenarioSqlPrepare() {
  const c = await connect();
  try {
    await c.query(`PREPARE ${TABLE}_sqlp (int) AS SELECT $1 * 2`);
    const pid = await backendPid(c);
    for (let r = 1; r <= 5; r++) {
      await inTransaction(c, async () => {
        const got = await one(c, `sqlp_exec_${r}`, `EXECUTE ${TABLE}_sqlp(${r})`);
        expect(got === 2 * r, `EXECUTE of an SQL-level prepared statement gave ${got}`);
        expect((await backendPid(c)) === pid, 'PREPARE owner moved to another server connection');
      });
      await sleep(20);
    }
    await c.query(`DEALLOCATE ${TABLE}_sqlp`);
  } finally {
    await c.end().catch(() => {});
  }
}

async function checkRows() {
  const c = await connect();
  try {
    const res = await c.query(`SELECT count(*) AS t, count(DISTINCT client) AS d FROM ${TABLE}`);
    const [t, d] = [Number(res.rows[0].t), Number(res.rows[0].d)];
    expect(
      t === CLIENTS * TXNS && d === CLIENTS,
      `table has ${t} rows from ${d} clients, expected ${CLIENTS * TXNS} from ${CLIENTS}`
    );
  } finally {
    await c.end().catch(() => {});
  }
}

function reportAndExit() {
  if (failures.length === 0) {
    console.log(`${DRIVER}: OK`);
    process.exit(0);
  }
  const prepared = failures.filter((p) => p.includes('prepared statement'));
  console.log(
    `${DRIVER}: FAILED: ${failures.length} problem(s), ${prepared.length} about prepared statements`
  );
  // Scenario and check failures first: the 50 clients' ones are often all alike.
  const ordered = [
    ...failures.filter((p) => !p.startsWith('client ')),
    ...failures.filter((p) => p.startsWith('client ')),
  ];
  for (const p of ordered.slice(0, 40)) console.log(`  - ${p}`);
  if (ordered.length > 40) console.log(`  ... and ${ordered.length - 40} more`);
  process.exit(1);
}

async function main() {
  const started = Date.now();
  const secs = () => ((Date.now() - started) / 1000).toFixed(1);
  const setup = await connect();
  try {
    const v = await setup.query('SHOW server_version');
    console.log(`${DRIVER}: connected, server ${v.rows[0].server_version}`);
    await setup.query(`DROP TABLE IF EXISTS ${TABLE}`);
    await setup.query(`CREATE TABLE ${TABLE} (client int NOT NULL, seq int NOT NULL)`);
  } finally {
    await setup.end();
  }

  const clients = [];
  for (let i = 0; i < CLIENTS; i++) clients.push(client(i));
  await Promise.all(clients);
  console.log(
    `${DRIVER}: phase 1 (${CLIENTS} clients x ${TXNS} transactions) done in ${secs()} s, ` +
      `${failures.length} problem(s)`
  );

  const stop = { done: false };
  const churners = [0, 1, 2].map((n) => churn(n, stop));
  for (const [name, scenario] of [
    ['row count after phase 1', checkRows],
    ['LISTEN/NOTIFY', scenarioListen],
    ['temp table', scenarioTempTable],
    ['session advisory lock', scenarioAdvisoryLock],
    ['WITH HOLD cursor', scenarioHoldCursor],
    ['SQL-level PREPARE', scenarioSqlPrepare],
  ]) {
    try {
      await scenario();
      console.log(`${DRIVER}: ${name}: ok`);
    } catch (e) {
      fail(`${name}: ${describe(e)}`);
      console.log(`${DRIVER}: ${name}: FAILED`);
    }
  }
  stop.done = true;
  await Promise.all(churners);
  console.log(`${DRIVER}: finished in ${secs()} s`);
  reportAndExit();
}

setTimeout(() => {
  fail(`watchdog: the run did not finish within ${WATCHDOG_SECONDS} s`);
  console.log(`${DRIVER}: TIMEOUT after ${WATCHDOG_SECONDS} s`);
  for (const p of failures.slice(0, 40)) console.log(`  - ${p}`);
  process.exit(3);
}, WATCHDOG_SECONDS * 1000);

main().catch((e) => {
  fail(`setup: ${describe(e)}`);
  reportAndExit();
});
