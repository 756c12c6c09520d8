#!/usr/bin/env bash
# Dense vs gated and low-rank FFNs in the default `ffwd lm` model (4 × 192, context 128, batch
# 16) on the embedded tiny-shakespeare, same seed: validation loss and training tokens/s after
# --steps steps (default 400). Gated FFNs at the dense FFN's parameters (dense 768 wide;
# swiglu/geglu 512 = ⅔ · 4d); low-rank FFNs (width 768) at 63 % (rank 97) and 32 % (rank 49);
# BlockDense (4 blocks) at 63 % (rank 156) and 33 % (rank 80); BlockShuffle (2 blocks) at 63 %
# (middle width 194) and 32 % (98).
#
#   bash bench/glu_lm.sh [--steps 400]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=400
if [ "${1:-}" = "--steps" ]; then STEPS=$2; fi
cargo build --release -q -p ffwd-cli
DIR=$(mktemp -d); trap 'rm -rf "$DIR"' EXIT
for spec in dense swiglu geglu lowrank:97 lowrank:49 blockdense:156 blockdense:80 blockshuffle:194 blockshuffle:98; do
  ffn=${spec%%:*}; name=${spec/:/-r}
  extra=(); if [ "$spec" != "$ffn" ]; then extra=(--rank "${spec#*:}"); fi
  target/release/ffwd lm train --ffn "$ffn" "${extra[@]}" --steps "$STEPS" --eval-every "$STEPS" --quiet --metrics "$DIR/$name.json" >/dev/null
  python3 -c "import json,sys; m=json.load(open('$DIR/$name.json')); print(json.dumps({'ffn': '$name', 'steps': m['steps'], 'val_loss': round(m['val_loss'], 4), 'val_bpc': round(m['val_bpc'], 3), 'train_tokens_per_s': round(m['train_tokens_per_s']), 'ffn_params': m['ffn_params'], 'params': m['params']}))"
done
