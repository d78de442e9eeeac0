#!/usr/bin/env bash
# The API from the shell: start the server first (`cargo run -p mezo-server -- serve`), then run
# this script. BASE defaults to the default address; set MEZO_API_KEY if the server has keys.
set -euo pipefail
BASE="${BASE:-http://127.0.0.1:8080}"
AUTH=()
if [ -n "${MEZO_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $MEZO_API_KEY"); fi

echo "== models"
curl -s "${AUTH[@]}" "$BASE/v1/models"; echo

echo "== a chat completion"
curl -s "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-135m-instruct",
  "messages": [{"role": "user", "content": "Name three primary colors."}],
  "max_tokens": 32, "temperature": 0
}'; echo

echo "== the same, streamed (server-sent events)"
curl -sN "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-135m-instruct",
  "messages": [{"role": "user", "content": "Name three primary colors."}],
  "max_tokens": 32, "temperature": 0, "stream": true,
  "stream_options": {"include_usage": true}
}'

echo "== scoring text: each prompt token's log-prob (echo + max_tokens 0)"
curl -s "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-135m-instruct",
  "prompt": "The capital of France is Paris.", "max_tokens": 0, "echo": true, "logprobs": 1
}'; echo

echo "== an error, in OpenAI's envelope"
curl -s "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]
}'; echo

echo "== health, readiness, metrics"
curl -s "$BASE/health"; echo
curl -s "$BASE/ready"; echo
curl -s "$BASE/metrics" | grep -E '^mezo_(http_requests_total|generation_tokens_total)' | head
