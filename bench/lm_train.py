#!/usr/bin/env python3
"""Language-model training throughput: `ffwd lm train` against its PyTorch twin, in one run.

The twin is the same model and recipe as ffwd's default (`ffwd lm train --help`): a
character-level pre-LayerNorm decoder, 4 blocks × d 192, 6 heads, context 128, learned
positions, tied embedding, FFN 192 → 768 → 192 with exact GELU; GPT-2 initialisation of the
embeddings and attention (N(0, 0.02²), output projection scaled by 1/√(2·layers)), PyTorch's
default Linear init for the FFN; AdamW (β 0.9/0.99, ε 1e-8, weight decay 0.1 on matrices and
embeddings, not on biases and norms), LR 1e-3 with 100 warmup steps and cosine decay to 1e-4,
global-norm clip 1, batch 16 × 128 random windows of tiny-shakespeare. Attention is
`F.scaled_dot_product_attention(is_causal=True)`, PyTorch's fastest eager path.

    python3 bench/lm_train.py [--steps 60] [--rounds 3] [--threads 2] [--precision f32|bf16]
                              [--compile] [--ffwd-args "..."]

Rounds alternate ffwd and PyTorch so that machine noise hits both; each side's figure is the
median over rounds of its training tokens/s (ffwd: its own step-time measurement from the
metrics file, evaluation excluded; PyTorch: wall time of the steps after 5 warm-up steps).
Local use only (`pip install torch`); never needed by the tests.
"""
import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ffwd_tokens_per_s(steps, threads, precision, extra):
    with tempfile.TemporaryDirectory() as d:
        metrics = os.path.join(d, "m.json")
        cmd = ["cargo", "run", "--release", "-q", "--", "lm", "train", "-q", "--steps", str(steps), "--eval-every", str(10 * steps), "--eval-batches", "1",
               "--threads", str(threads), "--metrics", metrics] + (["--precision", precision] if precision != "f32" else []) + extra
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        m = json.load(open(metrics))
        return m["history"][-1]["train_tokens_per_s"]


def torch_tokens_per_s(steps, threads, precision, compile_model, warmup=5):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    text = gzip.open(os.path.join(ROOT, "crates/ffwd/assets/tinyshakespeare.txt.gz"), "rt", encoding="utf-8").read()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[: len(text) * 9 // 10]], dtype=torch.long)
    V, T, D, H, L, W, B = len(chars), 128, 192, 6, 4, 768, 16

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.fc1, self.fc2 = nn.Linear(D, W), nn.Linear(W, D)
            for lin, std in ((self.qkv, 0.02), (self.proj, 0.02 / math.sqrt(2 * L))):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
            q, k, v = (z.view(b, t, H, D // H).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
            x = x + self.proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class Lm(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
            nn.init.normal_(self.tok.weight, std=0.02)
            nn.init.normal_(self.pos.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(D)

        def forward(self, idx, targets):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            logits = self.ln_f(x) @ self.tok.weight.t()
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = Lm()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    total = 3000

    def lr_at(s):
        if s < 100:
            return 1e-3 * (s + 1) / 100
        p = min((s - 100) / (total - 100), 1.0)
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    fwd = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(0)

    def step(s):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        x = torch.stack([ids[i:i + T] for i in starts])
        y = torch.stack([ids[i + 1:i + T + 1] for i in starts])
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        opt.zero_grad(set_to_none=True)
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fwd(x, y)
        else:
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for s in range(warmup):
        step(s)
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    return B * T * steps / (time.perf_counter() - t0), torch.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32", help="ffwd's precision (PyTorch runs f32, and bf16 autocast with --torch-bf16)")
    ap.add_argument("--torch-bf16", action="store_true", help="run PyTorch under bf16 autocast too")
    ap.add_argument("--compile", action="store_true", help="torch.compile the PyTorch model")
    ap.add_argument("--ffwd-args", default="", help="extra arguments for ffwd lm train")
    a = ap.parse_args()
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch not installed: measuring ffwd only", file=sys.stderr)
    ours, theirs, version = [], [], "-"
    for _ in range(a.rounds):
        ours.append(ffwd_tokens_per_s(a.steps, a.threads, a.precision, a.ffwd_args.split()))
        if have_torch:
            t, version = torch_tokens_per_s(a.steps, a.threads, "bf16" if a.torch_bf16 else "f32", a.compile)
            theirs.append(t)
    o = statistics.median(ours)
    print(f"ffwd  ({a.precision}) lm train, {a.steps} steps, {a.threads} threads: {o:8.0f} tokens/s (rounds: {', '.join(f'{v:.0f}' for v in ours)})")
    if have_torch:
        t = statistics.median(theirs)
        mode = ("compiled " if a.compile else "eager ") + ("bf16 autocast" if a.torch_bf16 else "f32")
        print(f"torch {version} ({mode}) same model and recipe: {t:8.0f} tokens/s (rounds: {', '.join(f'{v:.0f}' for v in theirs)})")
        print(f"speed ratio ffwd/torch = {o / t:.2f}")


if __name__ == "__main__":
    main()
