#!/usr/bin/env bash
# Set up (if needed), prepare SmolLM2-135M-Instruct, start a local 3-node cluster with a coordinator,
# stream an answer through it, show what it cost in credits, then replay it from the store for free.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HIVEGEN=.venv/bin/hivegen
PROMPT=${1:-"What is the capital of France? Answer in one sentence, then name two sights there."}

$HIVEGEN models prepare smollm2 | tail -n 1

workdir=$(mktemp -d)
ready="$workdir/cluster.json"
$HIVEGEN cluster up --model smollm2 --nodes 3 --ready-file "$ready" &
cluster_pid=$!
trap 'kill -TERM $cluster_pid 2>/dev/null; wait $cluster_pid 2>/dev/null; rm -rf "$workdir"' EXIT

while [ ! -f "$ready" ]; do
  kill -0 $cluster_pid 2>/dev/null || { echo "the cluster failed to start" >&2; exit 1; }
  sleep 1
done
peers=$(.venv/bin/python -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["initial_peers"]))' "$ready")

store="$workdir/store"  # a fresh record store, so the first run really computes

echo
echo ">>> $PROMPT"
$HIVEGEN generate --model smollm2 --initial-peers $peers --prompt "$PROMPT" --max-new-tokens 64 --store "$store"
echo
echo "credits after the generation (nodes charge parameters x tokens they served):"
.venv/bin/python scripts/demo_credits.py "$ready"

echo
echo ">>> the same request again: answered from the store, no node works, nothing is charged"
$HIVEGEN generate --model smollm2 --initial-peers $peers --prompt "$PROMPT" --max-new-tokens 64 --store "$store"
echo
echo "credits after the replay:"
.venv/bin/python scripts/demo_credits.py "$ready"
