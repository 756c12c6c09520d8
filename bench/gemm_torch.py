#!/usr/bin/env python3
"""f32 GEMM 1024³ against PyTorch, alternating: each round runs ffwd's GEMM benchmark
(`cargo bench --bench gemm -- --json`, its 1024x1024 row: the median of repeated products) and
then `torch.matmul` on the same shape for the same time budget; prints the medians over rounds
and their ratio (> 1: ffwd faster). Local use: needs torch.

    python3 bench/gemm_torch.py [--rounds 5] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_gflops(torch, budget_s=1.0):
    p, q = torch.rand(1024, 1024), torch.rand(1024, 1024)
    p @ q
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        p @ q
        times.append(time.perf_counter() - t)
    return 2 * 1024 ** 3 / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    cmd = ["cargo", "bench", "-q", "--bench", "gemm", "--", "--json", "--threads", str(a.threads)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)  # build once, outside the rounds
    ours, theirs = [], []
    for _ in range(a.rounds):
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        ours.append(next(json.loads(l)["gflops"] for l in out.splitlines() if l.startswith("{") and json.loads(l)["shape"].startswith("1024x1024")))
        theirs.append(torch_gflops(torch))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"ffwd  f32 GEMM 1024^3, {a.threads} threads: {o:.0f} GFLOP/s (rounds: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"torch {torch.__version__} same product:     {t:.0f} GFLOP/s (rounds: {', '.join(f'{v:.0f}' for v in theirs)})")
    print(f"speed ratio ffwd/torch = {o / t:.2f}")


if __name__ == "__main__":
    main()
