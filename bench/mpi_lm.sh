#!/usr/bin/env bash
# Data parallel against threads on one machine: the default LM, global batch 16 (8 x accum 2),
# 100 steps; 1 process x 2 threads and `mpirun -n 2` x 1 thread alternate over 3 rounds.
#   cargo build --release --features ffwd-cli/mpi && bash bench/mpi_lm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/ffwd
run="lm train --batch 8 --accum 2 --steps 100 --eval-every 1000 --quiet"
for round in 1 2 3; do
  echo "round $round, 1 process x 2 threads: $($B $run --threads 2 2>&1 | grep 'val loss')"
  echo "round $round, 2 ranks x 1 thread: $(mpirun --allow-run-as-root --oversubscribe -n 2 $B $run --threads 1 2>&1 | grep -E 'val loss|data parallel' | tr '\n' ' ')"
done
echo "once, 1 process x 1 thread: $($B $run --threads 1 2>&1 | grep 'val loss')"
