#!/usr/bin/env bash
# End-to-end benchmark of the release binary with the deterministic embedder and the real SQLite
# store: wall time, peak RSS (streaming proof), per-stage busy time, wall / busiest stage, at 1 and
# 2 CPU threads.  Usage: bench_e2e.sh BIN CORPUS
set -euo pipefail
bin=$1; corpus=$2
size=$(stat -c %s "$corpus")
for threads in 1 2; do
  data=$(mktemp -d)
  out=$(mktemp)
  /usr/bin/time -f '%M %e %U %S' -o "$out.time" env ORBIT_DATA_DIR="$data" ORBIT_EMBEDDER=hashing \
    ORBIT_CPU_THREADS=$threads "$bin" build --all-users --json --source "$corpus" > "$out"
  read -r rss_kb wall user sys < "$out.time"
  python3 - "$out" "$rss_kb" "$wall" "$user" "$sys" "$size" "$threads" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss_mb, wall, user, sysc = int(sys.argv[2]) / 1024, float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
size, threads = int(sys.argv[6]), sys.argv[7]
busiest = max(r["stages"], key=lambda s: s["busy_ms"])
print(f"== {threads} CPU thread(s): {size/1e6:.0f} MB, {r['documents_read']} documents, {r['chunks']} chunks, {r['tokens']} tokens")
print(f"   wall {wall:.1f} s ({size/1e6/wall:.1f} MB/s), cpu {user+sysc:.1f} s, peak RSS {rss_mb:.0f} MB")
for s in r["stages"]:
    print(f"   {s['name']:<8} busy {s['busy_ms']/1000:8.2f} s   waited on previous {s['wait_upstream_ms']/1000:8.2f} s   on next {s['wait_downstream_ms']/1000:8.2f} s")
print(f"   wall / busiest stage ({busiest['name']}) = {r['wall_ms']/busiest['busy_ms']:.3f}")
PY
  rm -rf "$data" "$out" "$out.time"
done
