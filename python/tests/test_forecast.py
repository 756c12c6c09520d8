"""AR-Net forecasting from Python: arrays and CSV files, forecasts, save/load, errors."""

import pathlib

import numpy as np
import pytest

import ffwd

SUNSPOTS = pathlib.Path(__file__).resolve().parents[2] / "crates" / "ffwd" / "assets" / "timeseries" / "sunspots.csv"


def ar2(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.float32)
    for t in range(2, n):
        y[t] = 0.5 + 0.6 * y[t - 1] - 0.3 * y[t - 2] + 0.1 * rng.normal()
    return y


def test_array_series_finds_its_lags_and_forecasts(tmp_path):
    y = ar2()
    model, out = ffwd.train_forecaster(y, lags=8, sparsity=0.3, epochs=60)
    report = out["report"]
    assert report["active_lags"] == [1, 2]
    test = next(m for m in report["metrics"] if m["split"] == "test")
    assert test["model"]["mase"] < test["seasonal_naive"]["mase"]
    nxt = model.forecast(y)
    assert nxt.shape == (1,) and np.isfinite(nxt).all()
    path = tmp_path / "f.safetensors"
    model.save(path)
    back = ffwd.Forecaster.load(path)
    assert np.array_equal(back.forecast(y), nxt)
    assert back.config["lags"] == 8


def test_csv_series_with_an_ffn():
    model, out = ffwd.train_forecaster(SUNSPOTS, lags=12, horizon=3, ffn="dense", width=8, epochs=5)
    assert out["report"]["column"] == "SUNACTIVITY" and out["report"]["horizon"] == 3
    assert model.config["layer"]["kind"] == "dense"


def test_errors_are_one_line():
    with pytest.raises(ValueError, match="unknown field `nope`"):
        ffwd.train_forecaster(ar2(), nope=1)
    with pytest.raises(ValueError, match="give ffn too"):
        ffwd.train_forecaster(ar2(), width=8)
    with pytest.raises(ValueError, match="too short"):
        ffwd.train_forecaster(ar2(20), lags=12)
    with pytest.raises(TypeError):
        ffwd.train_forecaster([1.0, 2.0])
    model, _ = ffwd.train_forecaster(ar2(), lags=4, epochs=2)
    with pytest.raises(ValueError, match="last 4 values"):
        model.forecast(np.zeros(2, dtype=np.float32))
