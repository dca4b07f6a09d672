#!/usr/bin/env bash
# Set up (if needed), prepare SmolLM2-135M-Instruct, start a local 3-node cluster with a coordinator,
# stream an answer through it, show what it cost in credits, replay it from the store for free, then ask the
# same swarm over the OpenAI-compatible API with curl.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HIVEGEN=.venv/bin/hivegen
PROMPT=${1:-"What is the capital of France? Answer in one sentence, then name two sights there."}

$HIVEGEN models prepare smollm2 | tail -n 1

workdir=$(mktemp -d)
ready="$workdir/cluster.json"
$HIVEGEN cluster up --model smollm2 --nodes 3 --api-port 0 --ready-file "$ready" &
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

api=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["api_url"])' "$ready")
echo
echo ">>> the same swarm through the OpenAI-compatible API: curl $api/chat/completions"
curl -sS -D "$workdir/headers" -o "$workdir/answer.json" "$api/chat/completions" \
  -H 'content-type: application/json' \
  -d "{\"model\": \"smollm2\", \"max_tokens\": 48, \"temperature\": 0,
       \"messages\": [{\"role\": \"user\", \"content\": \"Name three colours of the rainbow.\"}]}"
grep -i '^x-hivegen' "$workdir/headers"
.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"])' \
  "$workdir/answer.json"
