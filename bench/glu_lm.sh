#!/usr/bin/env bash
# Dense vs gated and structured FFNs in the default `ffwd lm` model (4 × 192, context 128, batch
# 16) on the embedded tiny-shakespeare, same seed: validation loss and training tokens/s after
# --steps steps (default 400). Gated FFNs at the dense FFN's parameters (dense 768 wide;
# swiglu/geglu 512 = ⅔ · 4d); low-rank FFNs (width 768) at 63 % (rank 97) and 32 % (rank 49);
# BlockDense (4 blocks) at 63 % (rank 156) and 33 % (rank 80); BlockShuffle (2 blocks) at 63 %
# (middle width 194) and 32 % (98). `--guided` runs instead the six structured FFNs with
# self-guided training (`--guided 0.5`: α from 1 to 0 over the first half of the steps).
# `--only "dense lowrank:49"` runs a subset (entries as in the list below).
#
#   bash bench/glu_lm.sh [--steps 400] [--guided] [--only "SPEC …"]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=400
SPECS="dense swiglu geglu lowrank:97 lowrank:49 blockdense:156 blockdense:80 blockshuffle:194 blockshuffle:98"
GUIDED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --guided) GUIDED=1; shift ;;
    --only) SPECS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release -q -p ffwd-cli
DIR=$(mktemp -d); trap 'rm -rf "$DIR"' EXIT
run() { # spec, extra flags…
  local spec=$1; shift
  local ffn=${spec%%:*} name=${spec/:/-r}
  local extra=("$@")
  if [ "$spec" != "$ffn" ]; then extra+=(--rank "${spec#*:}"); fi
  if [ ${#extra[@]} -gt 0 ] && [[ " ${extra[*]} " == *" --guided "* ]]; then name="$name-guided"; fi
  target/release/ffwd lm train --ffn "$ffn" "${extra[@]}" --steps "$STEPS" --eval-every "$STEPS" --quiet --metrics "$DIR/$name.json" >/dev/null
  python3 -c "import json,sys; m=json.load(open('$DIR/$name.json')); print(json.dumps({'ffn': '$name', 'steps': m['steps'], 'val_loss': round(m['val_loss'], 4), 'val_bpc': round(m['val_bpc'], 3), 'train_tokens_per_s': round(m['train_tokens_per_s']), 'ffn_params': m['ffn_params'], 'params': m['params']}))"
}
for spec in $SPECS; do
  if [ "$GUIDED" = 0 ]; then run "$spec"
  elif [[ "$spec" == *:* ]]; then run "$spec" --guided; fi
done
