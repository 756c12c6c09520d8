#!/usr/bin/env bash
# `ffwd serve` under load (loopback only): requests/s and p50/p99 latency at concurrency 1, 8
# and 64, with dynamic batching (--max-batch 64) and without (--max-batch 1), for MNIST dense
# and fff classifiers (JSON bodies, and raw f32 bodies for dense), a wide dense classifier
# (784-4096-10) where the model rather than HTTP is the bottleneck, and aggregate LM tokens/s
# with 1 and 8 concurrent streams. The two
# server settings alternate over --rounds rounds. With --soak: a 60-second run at
# concurrency 64 against the batching server, resident memory read at its start and end.
#
#   bash bench/serve.sh [--rounds 2] [--seconds 4] [--soak]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=2; SECONDS_PER=4; SOAK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --seconds) SECONDS_PER=$2; shift 2 ;;
    --soak) SOAK=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release -q -p ffwd-cli -p ffwd-serve
FFWD=target/release/ffwd; LOAD=target/release/ffwd-loadgen
DIR=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
MNIST=${MNIST:-../shared/data/mnist}
# the MNIST models of the results tables' configs (2 epochs: serving speed depends on the shapes)
$FFWD train --config configs/mnist-dense.toml --data "idx:$MNIST" --epochs 2 --save "$DIR/dense.safetensors" -q
$FFWD train --config configs/mnist-fff.toml --data "idx:$MNIST" --epochs 2 --save "$DIR/fff.safetensors" -q
$FFWD train --config configs/mnist-dense.toml --data "idx:$MNIST" --width 4096 --epochs 1 --save "$DIR/wide.safetensors" -q
# the default LM (4 × 192, context 128), briefly trained
$FFWD lm train --steps 30 --save "$DIR/lm.safetensors" -q
PORT=18700
start() { # max_batch
  PORT=$((PORT + 1))
  $FFWD serve --model "dense=$DIR/dense.safetensors" --model "fff=$DIR/fff.safetensors" --model "wide=$DIR/wide.safetensors" \
    --model "lm=$DIR/lm.safetensors" \
    --port $PORT --max-batch "$1" 2>"$DIR/serve.log" &
  SERVER=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server did not start" >&2; cat "$DIR/serve.log" >&2; exit 1
}
stop() { kill -TERM "$SERVER"; wait "$SERVER" || true; }
load() { $LOAD --addr "127.0.0.1:$PORT" --seconds "$SECONDS_PER" "$@"; }
export RUST_LOG=warn
for round in $(seq "$ROUNDS"); do
  for batch in 64 1; do
    start $batch
    for c in 1 8 64; do
      load --model dense --width 784 --concurrency $c | sed "s/^{/{\"round\":$round,\"max_batch\":$batch,/"
      load --model fff --width 784 --concurrency $c | sed "s/^{/{\"round\":$round,\"max_batch\":$batch,/"
      load --model dense --width 784 --concurrency $c --raw | sed "s/^{/{\"round\":$round,\"max_batch\":$batch,/"
      load --model wide --width 784 --concurrency $c --raw | sed "s/^{/{\"round\":$round,\"max_batch\":$batch,/"
    done
    for c in 1 8; do
      load --model lm --completions --max-tokens 200 --concurrency $c | sed "s/^{/{\"round\":$round,\"max_batch\":$batch,/"
    done
    stop
  done
done
if [ "$SOAK" = 1 ]; then
  start 64
  load --model dense --width 784 --concurrency 64 --seconds 5 >/dev/null   # warm-up: buffers and pools at their working size
  rss0=$(ps -o rss= -p "$SERVER")
  load --model dense --width 784 --concurrency 64 --seconds 60 --requests 100000000 | sed 's/^{/{"soak":true,/'
  rss1=$(ps -o rss= -p "$SERVER")
  echo "{\"soak_rss_kib_start\":$rss0,\"soak_rss_kib_end\":$rss1}"
  stop
fi
