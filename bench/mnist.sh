#!/usr/bin/env bash
# Trains the MNIST classifiers of configs/ (dense w=128, FFF d=4 ℓ=8, UFFF depth 7, MoE, σ-MoE,
# PKM), saves
# checkpoints and metrics under runs/, and prints the README's table rows.
#   bash bench/mnist.sh [config names...]     (default: all six)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
mkdir -p runs
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(mnist-dense mnist-fff mnist-ufff mnist-moe mnist-smoe mnist-pkm)
for c in "${configs[@]}"; do
  ./target/release/ffwd train -q --config "configs/$c.toml" --metrics "runs/$c.json" --save "runs/$c.safetensors"
done
python3 - "${configs[@]}" <<'PY'
import json, sys
print("| config | layer | test acc | train acc | params | neurons/inference | epochs | train time |")
print("|---|---|---|---|---|---|---|---|")
for c in sys.argv[1:]:
    m = json.load(open(f"runs/{c}.json"))
    print(f"| `configs/{c}.toml` | {m['layer']['kind']} | {100*m['test_accuracy']:.2f}% | {100*m['train_accuracy']:.2f}% | {m['params']:,} | {m['neurons_per_inference']} | {m['epochs']} | {m['train_seconds']:.0f} s |")
PY
