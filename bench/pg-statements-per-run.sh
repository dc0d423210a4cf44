#!/usr/bin/env bash
# Counts the SQL statements PostgreSQL receives per pooled run: turns on statement logging
# (log_min_duration_statement = 0, reloaded, no restart) on the local cluster, runs
# `pond bench --pool` on it, turns logging off again and tallies the statements logged during the
# benchmark by their text (the first 100 characters), divided by the pooled runs the benchmark
# made (--samples + 2 × --runs). Every statement counts: BEGIN/COMMIT and the connection check too.
#
#   sudo bash bench/pg-statements-per-run.sh ./target/release/pond [RUNS] [SAMPLES]
#
# Needs root (or the postgres user) to read the server's log under /var/log/postgresql. Meant
# for a benchmark cluster: on exit it resets log_min_duration_statement with ALTER SYSTEM RESET
# (an earlier ALTER SYSTEM value of it goes too), and the log gets every statement with its
# parameters meanwhile.
set -euo pipefail
POND="${1:?usage: $0 POND_BINARY [RUNS] [SAMPLES]}"
RUNS="${2:-1000}"
SAMPLES="${3:-100}"
URL="${POND_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
LOG=$(ls /var/log/postgresql/postgresql-*-main.log | head -n1)
psql "$URL" -qc "ALTER SYSTEM SET log_min_duration_statement = 0" -c "SELECT pg_reload_conf()" >/dev/null
trap 'psql "$URL" -qc "ALTER SYSTEM RESET log_min_duration_statement" -c "SELECT pg_reload_conf()" >/dev/null' EXIT
sleep 1
start=$(wc -l < "$LOG")
"$POND" bench --pool --runs "$RUNS" --samples "$SAMPLES" --idle-workers 10 --database-url "$URL" 2>&1 \
  | grep -E "runs/s|p50|CPU per run"
sleep 1
tail -n +"$((start + 1))" "$LOG" | python3 -c '
import collections, re, sys
runs = int(sys.argv[1])
count = collections.Counter()
for line in sys.stdin:
    m = re.search(r"duration: [\d.]+ ms  (?:statement|execute [^:]*): (.*)", line)
    if m:
        count[re.sub(r"\s+", " ", m.group(1))[:100]] += 1
total = sum(count.values())
print(f"statements per pooled run: {total / runs:.1f} ({total} over {runs} pooled runs)")
for text, n in count.most_common(30):
    print(f"{n / runs:7.2f}  {text}")
' "$((SAMPLES + 2 * RUNS))"
