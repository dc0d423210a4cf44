// pg-boss measured the way `pond bench` measures Pond, on the same PostgreSQL: 16 producers
// enqueue JOBS no-op jobs with send() (one job each call), then work() drains them in batches
// of 16 with localConcurrency 16 in burst mode (fetching again at once while batches come back
// full). Prints one JSON line of figures. Used by compare-pgboss.sh.
//   node pgboss.mjs <server-url> [jobs]
import { PgBoss } from 'pg-boss';
import pg from 'pg';

const [serverUrl, jobsArg] = process.argv.slice(2);
const jobs = Number(jobsArg ?? 20000);
const producers = 16;
const withDatabase = (url, db) => {
  const u = new URL(url);
  u.pathname = '/' + db;
  return u.toString();
};

const admin = new pg.Client({ connectionString: serverUrl });
await admin.connect();
const db = `pgboss_bench_${process.pid}`;
await admin.query(`CREATE DATABASE ${db}`);
const url = withDatabase(serverUrl, db);

// The server's own counters for this database (pg_stat_statements only when preloaded).
async function activity() {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  const tx = await c.query('SELECT (xact_commit + xact_rollback)::BIGINT AS n FROM pg_stat_database WHERE datname = current_database()');
  const wal = await c.query('SELECT wal_sync::BIGINT AS n FROM pg_stat_wal');
  let statements = null;
  try {
    await c.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    const st = await c.query('SELECT COALESCE(SUM(calls), 0)::BIGINT AS n FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())');
    statements = Number(st.rows[0].n);
  } catch { /* not preloaded */ }
  await c.end();
  return { transactions: Number(tx.rows[0].n), wal: Number(wal.rows[0].n), statements };
}

let result;
try {
  const before = await activity();
  const boss = new PgBoss({ connectionString: url, max: 20 });
  boss.on('error', (e) => console.error('pg-boss:', e.message));
  await boss.start();
  await boss.createQueue('bench');

  let t = performance.now();
  await Promise.all(Array.from({ length: producers }, async (_, p) => {
    for (let i = p; i < jobs; i += producers) await boss.send('bench', { i });
  }));
  const enqueueSecs = (performance.now() - t) / 1000;

  t = performance.now();
  let seen = 0;
  await new Promise((resolve) => {
    boss.work('bench', { batchSize: 16, localConcurrency: 16, pollingIntervalSeconds: 0.5, burstWhenBatchFull: true }, async (batch) => {
      seen += batch.length;
      if (seen >= jobs) setTimeout(resolve, 0);
    });
  });
  // Until every job is stored as completed, not only handed to the handler.
  const check = new pg.Client({ connectionString: url });
  await check.connect();
  for (;;) {
    const r = await check.query("SELECT count(*)::BIGINT AS n FROM pgboss.job WHERE name = 'bench' AND state = 'completed'");
    if (Number(r.rows[0].n) >= jobs) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  const processSecs = (performance.now() - t) / 1000;
  await check.end();
  await boss.stop({ graceful: true, wait: true, timeout: 10000 });
  const after = await activity();
  result = {
    jobs,
    enqueue_per_sec: jobs / enqueueSecs,
    process_per_sec: jobs / processSecs,
    per_job: {
      statements: after.statements === null || before.statements === null ? null : (after.statements - before.statements) / jobs,
      transactions: (after.transactions - before.transactions) / jobs,
      wal_syncs: (after.wal - before.wal) / jobs,
    },
  };
} finally {
  await admin.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
  await admin.end();
}
console.log(JSON.stringify(result));
