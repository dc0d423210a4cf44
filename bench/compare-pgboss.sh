#!/usr/bin/env bash
# Pond beside pg-boss on the same PostgreSQL, in one invocation, interleaved rounds:
#   bash bench/compare-pgboss.sh [--rounds 3] [--runs 2000] [--jobs 20000] [--database-url URL]
# Each round runs pg-boss's enqueue (16 producers) and batched drain (bench/pgboss.mjs), then
# `pond bench --runs N --clients 16` on a scratch database of the same server and on SQLite,
# and prints the figures and Pond's ratio to pg-boss. pg-boss (pinned) is installed from npm
# into a cache outside the clone; the release binary is built when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3 RUNS=2000 JOBS=20000
URL="${POND_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --database-url) URL="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" = 0 ]; then CACHE=/var/cache/pond-ci; else CACHE="$HOME/.cache/pond-ci"; fi
PGBOSS="${POND_CI_CACHE:-$CACHE}/pgboss"
if [ ! -f "$PGBOSS/node_modules/pg-boss/package.json" ]; then
  command -v npm >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q nodejs npm; }
  mkdir -p "$PGBOSS"
  (cd "$PGBOSS" && npm install --no-audit --no-fund pg-boss@12.38.0 >/dev/null)
fi
TARGET="${CARGO_TARGET_DIR:-target}"
POND="$TARGET/release/pond"
[ -x "$POND" ] || cargo build --release --bin pond
# pg-boss 12 asks for Node.js >= 22.12; Debian 12 has 20. The npm registry's `node` package
# brings a Node.js 22 binary into the cache when the system's is older.
NODE=node
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>22||(a==22&&b>=12)?0:1)' 2>/dev/null; then
  NODE22="${POND_CI_CACHE:-$CACHE}/node22"
  [ -x "$NODE22/node_modules/.bin/node" ] || { mkdir -p "$NODE22" && (cd "$NODE22" && npm install --no-audit --no-fund node@22 >/dev/null 2>&1); }
  NODE="$NODE22/node_modules/.bin/node"
fi
echo "pg-boss $(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$PGBOSS/node_modules/pg-boss/package.json") on Node.js $("$NODE" --version); $("$POND" --version 2>/dev/null | head -1)"
# Node resolves the script's imports from where the script is.
cp bench/pgboss.mjs "$PGBOSS/pgboss.mjs"
BENCH_DIR="$(mktemp -d)"
trap 'rm -rf "$BENCH_DIR"' EXIT

field() { sed -n "s|^$1 *\([0-9.]*\) runs/s.*|\1|p"; }
printf '%-6s %12s %12s %14s %14s %14s %10s %10s\n' round pgboss_enq pgboss_proc pond_pg_submit pond_pg_e2e pond_sqlite_e2e pg_ratio sqlite_ratio
for round in $(seq 1 "$ROUNDS"); do
  boss=$(cd "$PGBOSS" && "$NODE" pgboss.mjs "$URL" "$JOBS")
  enq=$(echo "$boss" | sed -n 's/.*"enqueue_per_sec":\([0-9.]*\).*/\1/p')
  proc=$(echo "$boss" | sed -n 's/.*"process_per_sec":\([0-9.]*\).*/\1/p')
  pg_out=$("$POND" bench --data-dir "$BENCH_DIR/pg" --database-url "$URL" --runs "$RUNS" --clients 16 2>/dev/null)
  lite_out=$("$POND" bench --data-dir "$BENCH_DIR/lite" --runs "$RUNS" --clients 16 2>/dev/null)
  pg_submit=$(echo "$pg_out" | field 'submit (POST /v1/runs):')
  pg_e2e=$(echo "$pg_out" | field 'end to end (submit→done):')
  lite_e2e=$(echo "$lite_out" | field 'end to end (submit→done):')
  printf '%-6s %12.0f %12.0f %14.0f %14.0f %14.0f %10.3f %10.3f\n' "$round" "$enq" "$proc" "$pg_submit" "$pg_e2e" "$lite_e2e" \
    "$(awk "BEGIN { print $pg_e2e / $proc }")" "$(awk "BEGIN { print $lite_e2e / $proc }")"
  echo "  pg-boss per job: $(echo "$boss" | sed -n 's/.*"per_job":\(.*\)}$/\1/p')"
  echo "  pond (PostgreSQL): $(echo "$pg_out" | grep -E 'latency|work per run' | sed 's/^ *//' | tr '\n' ';')"
  echo "  pond (SQLite): $(echo "$lite_out" | grep -E 'end to end' | sed 's/^ *//')"
done
