#!/usr/bin/env bash
# make bench-store: the store stage on one machine, the embedded SQLite store against a Qdrant
# 1.18 server (loopback, fresh storage, one node), same binary, same corpus, the deterministic
# embedder (so the store is what is measured). Prints chunks, wall time and the store stage's
# busy time and rate for each, in the same run.
# usage: bench_store.sh BIN CORPUS START_QDRANT
set -euo pipefail
bin=$1; corpus=$2; start_qdrant=$3
tmp=$(mktemp -d)
qpid=
trap '[ -n "$qpid" ] && kill "$qpid" 2>/dev/null; rm -rf "$tmp"' EXIT
export ORBIT_EMBEDDER=hashing
unset DATABASE_URL QDRANT_URL || true
report() {
  python3 -c '
import json, sys
r = json.load(sys.stdin)
store = next(s for s in r["stages"] if s["name"] == "store")
busy, wall, n = store["busy_ms"] / 1000, r["wall_ms"] / 1000, r["chunks"]
print("%s: %d chunks, wall %.1f s, %.0f chunks/s; store busy %.1f s = %.0f chunks/s busy; bottleneck %s"
      % (sys.argv[1], n, wall, n / wall, busy, n / max(busy, 1e-9), r["bottleneck"]))
' "$1"
}
ORBIT_DATA_DIR=$tmp/embedded "$bin" build --all-users --source "$corpus" --json | report embedded
read -r _http grpc qpid < <(bash "$start_qdrant" "$tmp/qdrant")
QDRANT_URL=http://127.0.0.1:$grpc ORBIT_DATA_DIR=$tmp/unused \
  "$bin" build --all-users --source "$corpus" --json | report "qdrant server"
