#!/usr/bin/env python3
"""AR-Net on the three embedded series: linear AR-Net with its sparsity regulariser and the
same with a dense FFN, against seasonal-naive and least-squares AR, over several seeds.

    cargo build --release && python3 bench/forecast.py [--seeds 5]

Prints a markdown table (test-part MAE / RMSE / MASE, means over seeds; the lags AR-Net keeps
in every seed) for the README.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FFWD = os.path.join(ROOT, "target", "release", "ffwd")
ASSETS = os.path.join(ROOT, "crates", "ffwd", "assets", "timeseries")
SERIES = [
    ("sunspots (yearly)", ["--data", f"{ASSETS}/sunspots.csv", "--lags", "24", "--sparsity", "0.3"]),
    ("electrical equipment (monthly)", ["--data", f"{ASSETS}/elec_equip.csv", "--lags", "24", "--sparsity", "0.3"]),
    ("Mauna Loa CO2 (weekly)", ["--data", f"{ASSETS}/co2.csv", "--fill", "linear", "--lags", "60", "--sparsity", "0.01"]),
]
VARIANTS = [("linear AR-Net", []), ("AR-Net + dense FFN 32", ["--ffn", "dense", "--width", "32", "--weight-decay", "3"])]


def run(args, seed):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([FFWD, "forecast", "train", *args, "--seed", str(seed), "--quiet", "--metrics", f.name], check=True, capture_output=True)
        return json.load(open(f.name))["report"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    print("| series | model | val MASE | test MAE | test RMSE | test MASE | lags kept (all seeds) |")
    print("|---|---|---|---|---|---|---|")
    for name, args in SERIES:
        first = None
        for vname, vargs in VARIANTS:
            reps = [run(args + vargs, s) for s in range(a.seeds)]
            first = first or reps[0]
            test = [next(m for m in r["metrics"] if m["split"] == "test") for r in reps]
            val = [next(m for m in r["metrics"] if m["split"] == "val") for r in reps]
            mean = lambda xs: statistics.mean(xs)
            kept = sorted(set.intersection(*[set(r["active_lags"]) for r in reps]))
            print(f"| {name} | {vname} | {mean([v['model']['mase'] for v in val]):.3f} | {mean([t['model']['mae'] for t in test]):.3f} | "
                  f"{mean([t['model']['rmse'] for t in test]):.3f} | **{mean([t['model']['mase'] for t in test]):.3f}** | {kept} |")
        t = next(m for m in first["metrics"] if m["split"] == "test")
        v = next(m for m in first["metrics"] if m["split"] == "val")
        for key, label in [("seasonal_naive", f"seasonal-naive (m = {first['season']})"), ("ar_least_squares", f"least-squares AR({first['lags']})")]:
            print(f"| {name} | {label} | {v[key]['mase']:.3f} | {t[key]['mae']:.3f} | {t[key]['rmse']:.3f} | {t[key]['mase']:.3f} | AIC order {first['aic_order']}, BIC order {first['bic_order']} |")


if __name__ == "__main__":
    main()
