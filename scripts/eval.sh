#!/usr/bin/env bash
# Retrieval eval on the project's eval set (fixtures/eval/): builds the conversations into a fresh
# store with the configured embedder (default: the local model) and prints `orbit-worker eval`
# for every mode, with the fusion sweep. Extra arguments go to `eval` (e.g. --json).
# Usage: eval.sh BIN [eval args...]
set -euo pipefail
bin=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
export ORBIT_DATA_DIR=$data ORBIT_EMBEDDER=${ORBIT_EMBEDDER:-local}
"$bin" build --all-users --source "$here/fixtures/eval/conversations.jsonl" >&2
"$bin" eval --questions "$here/fixtures/eval/questions.jsonl" --top-k 1,3,5,10 --sweep "$@"
