#!/bin/bash
# usage: deploy/tts-first-request.sh BIN_DIR LABEL
# Starts capibara-api and a tts-only capibara-worker from BIN_DIR on a fresh database of the test
# Postgres (127.0.0.1:25432) and Redis (26379), waits for the worker's /readyz, then sends three
# POST /v1/tts requests and prints each one's first_chunk_ms and model_loaded; then, on a fresh
# worker, three GET /v1/tts/stream (WebSocket) requests and the time to each one's first audio
# frame, as a client sees it. See docs/benchmarks.md ("TTS: the first request of a worker").
set -u
BIN=$1; LABEL=$2
DB=ttsb_$RANDOM$RANDOM
createdb -h 127.0.0.1 -p 25432 -U capibara $DB
export CAPIBARA_DATABASE_URL=postgres://capibara@127.0.0.1:25432/$DB
export CAPIBARA_REDIS_URL=redis://127.0.0.1:26379/ CAPIBARA_REDIS_PREFIX=$DB
export CAPIBARA_ADMIN_KEY=cap_ttsbench_key_0123456789abcdef
export CAPIBARA_SECRETS_KEY=$(openssl rand -base64 32)
export CAPIBARA_API_ADDR=127.0.0.1:18931 CAPIBARA_WORKER_ADDR=127.0.0.1:18932
export CAPIBARA_ASSETS_DIR=${CAPIBARA_ASSETS_DIR:-$PWD/.capibara/assets}
export CAPIBARA_ARTIFACTS=/tmp/$DB CAPIBARA_LOG=warn
$BIN/capibara-api >/tmp/$DB.api.log 2>&1 & A=$!
$BIN/capibara-worker --queues tts >/tmp/$DB.w.log 2>&1 & W=$!
for i in $(seq 1 120); do
  s=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18932/readyz); [ "$s" = 200 ] && break; sleep 0.5; done
sleep 2
for n in 1 2 3; do
  curl -s -X POST http://127.0.0.1:18931/v1/tts -H "Authorization: Bearer $CAPIBARA_ADMIN_KEY" -H 'Prefer: wait=60' \
    -H 'Content-Type: application/json' -d '{"text": "Hello there. This is the first request of this worker."}' \
    | python3 -c "import sys,json; o=json.load(sys.stdin)['output']; print('$LABEL', 'request $n', 'first_chunk_ms', o['first_chunk_ms'], 'model_loaded', o.get('model_loaded'))"
done
kill $W; wait $W 2>/dev/null
$BIN/capibara-worker --queues tts >/tmp/$DB.w2.log 2>&1 & W=$!
for i in $(seq 1 120); do
  s=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18932/readyz); [ "$s" = 200 ] && break; sleep 0.5; done
sleep 2
for n in 1 2 3; do
  echo "$LABEL stream request $n $(python3 "$(dirname "$0")/tts-ws-first-chunk.py" 127.0.0.1:18931 "$CAPIBARA_ADMIN_KEY" \
    'Hello there. This is a request over the WebSocket.')"
done
kill $A $W; wait $A $W 2>/dev/null
dropdb -h 127.0.0.1 -p 25432 -U capibara $DB; rm -rf /tmp/$DB /tmp/$DB.*.log
