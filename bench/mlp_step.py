#!/usr/bin/env python3
"""One AdamW training step of a 784-256-10 ReLU MLP at batch 128: ffwd vs PyTorch (CPU),
measured in the same run. Runs `cargo bench --bench mlp_step -- --json`, then PyTorch if it
is installed (`pip install torch`; never needed for tests), and prints medians and the ratio.

    python3 bench/mlp_step.py [--threads 2] [--rounds 3]

Rounds alternate ffwd and torch so that machine noise hits both; the reported figure is the
median over rounds of each side's median step time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ffwd_step(threads):
    out = subprocess.run(
        ["cargo", "bench", "-q", "--bench", "mlp_step", "--", "--json", "--threads", str(threads)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)["median_us"]


def torch_step(threads, reps=1000):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.rand(128, 784)
    y = torch.randint(0, 10, (128,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(100):
        step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return times[len(times) // 2], torch.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch not installed: measuring ffwd only", file=sys.stderr)
    ours, theirs, version = [], [], None
    for _ in range(a.rounds):
        ours.append(ffwd_step(a.threads))
        if have_torch:
            t, version = torch_step(a.threads)
            theirs.append(t)
    o = statistics.median(ours)
    print(f"ffwd   AdamW step 784-256-10 batch 128, {a.threads} threads: {o:8.1f} µs (rounds: {', '.join(f'{v:.0f}' for v in ours)})")
    if have_torch:
        t = statistics.median(theirs)
        print(f"torch  {version:>5} same step:                            {t:8.1f} µs (rounds: {', '.join(f'{v:.0f}' for v in theirs)})")
        print(f"ratio ffwd/torch = {o / t:.2f}")


if __name__ == "__main__":
    main()
