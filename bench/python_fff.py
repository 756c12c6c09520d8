#!/usr/bin/env python3
"""ffwd.layers.FFF.from_fastfeedforward(m).forward(x) against fastfeedforward's own
m.eval_forward(x) in the same Python process, alternating, at batch 256 (width 768, leaf 32,
depth 4 and 8), with the outputs checked equal (eval_forward + the b2s it drops).

    python3 bench/python_fff.py [--rounds 5] [--batch 256] [--depths 4,8]

Needs torch, fastfeedforward and the ffwd package (`pip install ./python`).
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
import fastfeedforward

import ffwd
import ffwd.torch


def median_ms(f, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def leaves(m, x, depth):
    node = torch.zeros(len(x), dtype=torch.long)
    for _ in range(depth):
        z = (x * m.node_weights[node]).sum(-1) + m.node_biases[node].squeeze(-1)
        node = 2 * node + 1 + (z >= 0).long()
    return node - (2**depth - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--leaf", type=int, default=32)
    ap.add_argument("--depths", default="4,8", help="comma-separated tree depths")
    a = ap.parse_args()
    torch.manual_seed(0)
    for depth in [int(d) for d in a.depths.split(",")]:
        m = fastfeedforward.FFF(a.width, a.leaf, a.width, depth).eval()
        fast = ffwd.layers.FFF.from_fastfeedforward(m)
        wrapped = ffwd.torch.from_fastfeedforward(m)
        x = torch.randn(a.batch, a.width)
        xn = x.numpy()
        with torch.no_grad():
            want = (m.eval_forward(x) + m.b2s[leaves(m, x, depth)]).numpy()
            got = fast.forward(xn)
            err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))
            assert err < 1e-4, f"outputs differ: relative max error {err}"
            ref, ours, mod = [], [], []
            for _ in range(a.rounds):
                ref.append(median_ms(lambda: m.eval_forward(x), 3))
                ours.append(median_ms(lambda: fast.forward(xn), 50))
                mod.append(median_ms(lambda: wrapped(x), 50))
        r, o, w = statistics.median(ref), statistics.median(ours), statistics.median(mod)
        print(json.dumps({"depth": depth, "leaf": a.leaf, "width": a.width, "batch": a.batch, "torch_threads": torch.get_num_threads(), "ffwd_threads": ffwd.threads(),
                          "leaf_weights_mb": round((2**depth) * 2 * a.width * a.leaf * 4 / 1e6, 1), "eval_forward_ms": r, "ffwd_forward_ms": o, "ffwd_torch_module_ms": w, "speedup": r / o, "speedup_module": r / w, "max_rel_error": err}))


if __name__ == "__main__":
    main()
