#!/usr/bin/env python3
"""Conditional inference against PyTorch, in one run: `ffwd bench --json` (our tree and mixture
kernels and our dense baseline), then, when installed, PyTorch's dense feedforward of the same
shapes, the `fastfeedforward` package's FFF `eval_forward`, and for the σ-MoE/MoE rows a
PyTorch per-expert loop (the Hugging Face Mixtral block's dispatch: top-k, then for every
expert `index_select` its tokens, two matmuls, `index_add_` back) (local use only: `pip
install torch fastfeedforward`; never needed by the tests).

    python3 bench/compare_torch.py [--quick] [--threads 2] [--only smoe,moe]

Prints one row per (layer, shape, batch) with the medians and the ratios
torch_dense / ffwd (the conditional layer against PyTorch's dense layer of equal width, the
headline figure), torch_dense / ffwd_dense (the two dense layers against each other: > 1 means
ffwd's dense layer is faster), fastfeedforward / ffwd_fff and torch_moe_loop / ffwd_moe. Rows
of bf16 weights (`dense-bf16`, `ufff-bf16`, `fff-bf16`) also time PyTorch's dense layer in
bfloat16 (`module.to(torch.bfloat16)`, bf16 input) and print torch_bf16 / ffwd.
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
    ap.add_argument("--only", default="", help="suite rows to run (comma-separated layer names)")
    ap.add_argument("--json", default="", help="also write every row as a JSON line here (ffwd bench --json fields plus torch_dense_us, fastff_us, torch_loop_us), for `ffwd report --bench`")
    ap.add_argument("--fff-batches", default="256", help="batches at which to run fastfeedforward (its eval loops in Python)")
    a = ap.parse_args()
    cmd = ["cargo", "run", "--release", "-q", "--", "bench", "--json", "--threads", str(a.threads)] + (["--quick"] if a.quick else []) + (["--only", a.only] if a.only else [])
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
    out = open(a.json, "w") if a.json else None
    print(f"{'layer':<5} {'shape':<42} {'batch':>5} {'ffwd cond':>11} {'ffwd dense':>11} {'torch dense':>12} {'fastff eval':>12} {'torch loop':>11} {'torch/ffwd':>10} {'dense t/f':>9} {'fastff/ffwd':>11} {'loop/ffwd':>9} {'torch bf16':>11} {'bf16 t/f':>8}")
    for r in rows:
        batch, layer = r["batch"], r["layer"]
        d = 512 if layer in ("smoe", "smoe-bf16", "moe", "pkm") else 768
        torch_us = fastff_us = loop_us = torch16_us = None
        if torch is not None:
            if layer.startswith("ufff") or layer.startswith("dense-"):  # ufff, its bf16/q8/q4 rows and the quantized dense: the same f32 dense twin
                width, act = 4095, torch.nn.GELU()
            elif layer in ("smoe", "smoe-bf16", "moe", "pkm"):
                width, act = 4096, torch.nn.ReLU()
            else:
                depth = int(re.search(r"depth (\d+)", r["shape"]).group(1))
                width, act = 32 << depth, torch.nn.ReLU()
            model = torch.nn.Sequential(torch.nn.Linear(d, width), act, torch.nn.Linear(width, d)).eval()
            x = torch.randn(batch, d)
            with torch.inference_mode():
                torch_us = median_us(lambda: model(x))
                if r.get("weights") == "bf16":
                    m16, x16 = model.to(torch.bfloat16), x.to(torch.bfloat16)
                    torch16_us = median_us(lambda: m16(x16))
            del model
            if FFF is not None and layer.startswith("fff") and batch in fff_batches:
                f = FFF(d, 32, d, depth).eval()
                with torch.inference_mode():
                    fastff_us = median_us(lambda: f(x), budget_s=1.0, min_reps=3)
                del f
            if layer in ("smoe", "smoe-bf16", "moe"):
                loop_us = torch_moe_loop_us(torch, batch, sigmoid=(layer != "moe"))
        tr = f"{torch_us / r['median_us']:.1f}x" if torch_us else "-"
        dr = f"{torch_us / r['dense_median_us']:.2f}" if torch_us else "-"
        fr = f"{fastff_us / r['median_us']:.0f}x" if fastff_us else "-"
        lr = f"{loop_us / r['median_us']:.1f}x" if loop_us else "-"
        br = f"{torch16_us / r['median_us']:.2f}x" if torch16_us else "-"
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"
        print(f"{layer:<5} {r['shape']:<42} {batch:>5} {r['median_us']:>11.1f} {r['dense_median_us']:>11.1f} {fmt(torch_us):>12} {fmt(fastff_us):>12} {fmt(loop_us):>11} {tr:>10} {dr:>9} {fr:>11} {lr:>9} {fmt(torch16_us):>11} {br:>8}")
        if out:
            out.write(json.dumps({**r, "torch_dense_us": torch_us, "fastff_us": fastff_us, "torch_loop_us": loop_us, "torch_bf16_us": torch16_us}) + "\n")
    if out:
        out.close()


def torch_moe_loop_us(torch, batch, sigmoid, d=512, experts=32, g=128, k=4):
    """The Hugging Face Mixtral sparse block's dispatch at the σ-MoE benchmark shape."""
    router = torch.nn.Linear(d, experts, bias=False)
    w1 = [torch.nn.Linear(d, g) for _ in range(experts)]
    w2 = [torch.nn.Linear(g, d, bias=False) for _ in range(experts)]
    x = torch.randn(batch, d)

    def forward():
        logits = router(x)
        scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
        gates, chosen = torch.topk(scores, k, dim=-1)
        if not sigmoid:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(chosen, experts).permute(2, 1, 0)
        for e in range(experts):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            h = torch.relu(w1[e](x[tok]))
            y.index_add_(0, tok, w2[e](h) * gates[tok, slot, None])
        return y

    with torch.inference_mode():
        return median_us(forward)


if __name__ == "__main__":
    main()
