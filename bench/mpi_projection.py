#!/usr/bin/env python3
"""Projected data-parallel scaling of `ffwd lm train` from one measured step.

    python3 bench/mpi_projection.py --step-seconds S --grad-mb G [--wide-factor 100]

S: one training step's compute time on one node (measured: 1 process, all its cores, the
step's windows); G: the gradient bytes one all-reduce moves (ffwd prints it after an MPI run:
"all-reduce of G MB per step"). Ring all-reduce (Patarasuk & Yuan 2009) over N nodes:

    T_comm(N) = 2 (N - 1) / N * G / B + 2 (N - 1) * alpha

B the link bandwidth, alpha the per-message latency (20 us, TCP over Ethernet). Without
overlap, a step takes T_step = T_c + T_comm, and throughput relative to one node is
N * T_c / T_step (weak scaling: every node keeps its own batch) or
T_c_1 / (T_c_1 / N + T_comm) (strong scaling: a fixed global batch split N ways).
"""
import argparse


def t_comm(n, nbytes, bits_per_s, alpha=20e-6):
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes * 8 / bits_per_s + 2 * (n - 1) * alpha


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-seconds", type=float, required=True)
    ap.add_argument("--grad-mb", type=float, required=True)
    ap.add_argument("--wide-factor", type=float, default=100.0, help="parameters and per-step compute of the 10x wider model relative to the default (d^2: 100)")
    a = ap.parse_args()
    models = [("default LM", a.step_seconds, a.grad_mb * 1e6), ("10x wider LM", a.step_seconds * a.wide_factor, a.grad_mb * a.wide_factor * 1e6)]
    print("| model | link | N = 4 | N = 16 | N = 64 | strong scaling, N = 4 / 16 / 64 |")
    print("|---|---|---|---|---|---|")
    for name, tc, nbytes in models:
        for gbit in (10e9, 25e9, 100e9):
            weak = []
            for n in (4, 16, 64):
                tcm = t_comm(n, nbytes, gbit)
                weak.append(f"{n * tc / (tc + tcm):.1f}x ({100 * tcm / (tc + tcm):.1f} % comm)")
            strong = [f"{tc / (tc / n + t_comm(n, nbytes, gbit)):.1f}x" for n in (4, 16, 64)]
            print(f"| {name} (T_c {tc:.2f} s, {nbytes / 1e6:.0f} MB) | {gbit / 1e9:.0f} Gbit/s | {' | '.join(weak)} | {' / '.join(strong)} |")


if __name__ == "__main__":
    main()
