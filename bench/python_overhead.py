#!/usr/bin/env python3
"""Python call overhead of ffwd.Classifier.predict at batch 1 against the same library call
from Rust (`ffwd bench --model`: Classifier::predict on one row), in alternating rounds.

    python3 bench/python_overhead.py [--rounds 5] [--layer fff]

Needs the package installed (`pip install ./python`) and the CLI built (`cargo build --release`).
Prints the medians of each round and the median difference (Python − Rust) in µs.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import tempfile
import time

import numpy as np

import ffwd

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "ffwd"


def python_predict_us(model, x, calls):
    """Median µs of model.predict on one row (2-D, batch 1), a different row each call."""
    times = []
    n = len(x)
    for i in range(calls):
        row = x[i % n : i % n + 1]
        t = time.perf_counter_ns()
        model.predict(row)
        times.append((time.perf_counter_ns() - t) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layer", default="fff", help="layer of the digits classifier (ffwd train --layer)")
    ap.add_argument("--calls", type=int, default=20000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "digits.safetensors"
        subprocess.run([BIN, "train", "--layer", a.layer, "--quiet", "--save", path], check=True, capture_output=True)
        model = ffwd.Classifier.load(path)
        x = np.random.default_rng(0).uniform(0, 16, size=(1024, model.in_features)).astype(np.float32)
        python_predict_us(model, x, 2000)  # warm-up
        rust, py = [], []
        for r in range(a.rounds):
            out = subprocess.run([BIN, "bench", "--model", path, "--json", "--budget-ms", "500"], check=True, capture_output=True, text=True).stdout
            rust.append(json.loads(out)["predict_us_batch1"])
            py.append(python_predict_us(model, x, a.calls))
            print(f"round {r + 1}: Rust Classifier::predict {rust[-1]:.2} µs, Python predict {py[-1]:.2} µs, difference {py[-1] - rust[-1]:.2} µs")
        diffs = [p - q for p, q in zip(py, rust)]
        print(json.dumps({"layer": a.layer, "threads": ffwd.threads(), "rust_us": statistics.median(rust), "python_us": statistics.median(py), "overhead_us": statistics.median(diffs)}))


if __name__ == "__main__":
    main()
