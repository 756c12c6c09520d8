#!/usr/bin/env python3
"""Conditional inference against PyTorch, in one run: `ffwd bench --json` (our tree kernels and
our dense baseline), then, when installed, PyTorch's dense feedforward of the same shapes and
the `fastfeedforward` package's FFF `eval_forward` (local use only: `pip install torch
fastfeedforward`; never needed by the tests).

    python3 bench/compare_torch.py [--quick] [--threads 2]

Prints one row per (layer, shape, batch) with the medians and the ratios
torch_dense / ffwd_tree and fastfeedforward / ffwd_fff.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_us(fn, budget_s=0.4, min_reps=5):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 10000):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fff-batches", default="256", help="batches at which to run fastfeedforward (its eval loops in Python)")
    a = ap.parse_args()
    cmd = ["cargo", "run", "--release", "-q", "--", "bench", "--json", "--threads", str(a.threads)] + (["--quick"] if a.quick else [])
    rows = [json.loads(l) for l in subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines() if l.startswith("{")]
    try:
        import torch
        torch.set_num_threads(a.threads)
    except ImportError:
        torch = None
        print("torch not installed: ffwd figures only", file=sys.stderr)
    try:
        from fastfeedforward import FFF
    except ImportError:
        FFF = None
    fff_batches = {int(b) for b in a.fff_batches.split(",")}
    # Dense GEMM quality: f32 1024³ through ffwd's core (gemm crate, AVX-512) vs torch.matmul.
    g = [json.loads(l) for l in subprocess.run(["cargo", "bench", "-q", "--bench", "gemm", "--", "--json", "--threads", str(a.threads)], cwd=ROOT, check=True,
                                               capture_output=True, text=True).stdout.splitlines() if l.startswith("{")]
    ours = next(r["gflops"] for r in g if r["shape"].startswith("1024x1024"))
    if torch is not None:
        p, q = torch.rand(1024, 1024), torch.rand(1024, 1024)
        theirs = 2 * 1024 ** 3 / (median_us(lambda: p @ q, budget_s=1.0) * 1e-6) / 1e9
        print(f"GEMM f32 1024^3, {a.threads} threads: ffwd {ours:.0f} GFLOP/s, torch {theirs:.0f} GFLOP/s, ratio {ours / theirs:.2f}")
    else:
        print(f"GEMM f32 1024^3, {a.threads} threads: ffwd {ours:.0f} GFLOP/s")
    print(f"{'layer':<5} {'shape':<34} {'batch':>5} {'ffwd tree':>11} {'ffwd dense':>11} {'torch dense':>12} {'fastff eval':>12} {'torch/ffwd':>10} {'fastff/ffwd':>11}")
    for r in rows:
        d, batch, layer = 768, r["batch"], r["layer"]
        torch_us = fastff_us = None
        if torch is not None:
            if layer == "ufff":
                width, act = 4095, torch.nn.GELU()
            else:
                depth = int(re.search(r"depth (\d+)", r["shape"]).group(1))
                width, act = 32 << depth, torch.nn.ReLU()
            model = torch.nn.Sequential(torch.nn.Linear(d, width), act, torch.nn.Linear(width, d)).eval()
            x = torch.randn(batch, d)
            with torch.inference_mode():
                torch_us = median_us(lambda: model(x))
            del model
            if FFF is not None and layer == "fff" and batch in fff_batches:
                f = FFF(d, 32, d, depth).eval()
                with torch.inference_mode():
                    fastff_us = median_us(lambda: f(x), budget_s=1.0, min_reps=3)
                del f
        tr = f"{torch_us / r['median_us']:.1f}x" if torch_us else "-"
        fr = f"{fastff_us / r['median_us']:.0f}x" if fastff_us else "-"
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"
        print(f"{layer:<5} {r['shape']:<34} {batch:>5} {r['median_us']:>11.1f} {r['dense_median_us']:>11.1f} {fmt(torch_us):>12} {fmt(fastff_us):>12} {tr:>10} {fr:>11}")


if __name__ == "__main__":
    main()
