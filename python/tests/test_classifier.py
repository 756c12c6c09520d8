"""Classifier: training from NumPy, predictions against the Rust CLI, save/load, bad input."""

import subprocess

import numpy as np
import pytest

import ffwd


def test_train_predict_and_probabilities(blobs):
    x, y = blobs
    model, metrics = ffwd.train_classifier(x, y, layer="fff", depth=2, epochs=30, seed=1)
    assert metrics["test_accuracy"] > 0.9, metrics["test_accuracy"]
    assert metrics["config"]["fff"]["depth"] == 2 and model.layer == "fff"
    assert (model.in_features, model.n_classes) == (8, 3)
    pred = model.predict(x)
    assert pred.dtype == np.int64 and pred.shape == (600,)
    assert (pred == y).mean() > 0.9
    proba = model.predict_proba(x)
    assert proba.dtype == np.float32 and proba.shape == (600, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (proba.argmax(axis=1) == pred).all()
    # one sample as a 1-D array
    assert int(model.predict(x[5])) == pred[5]
    np.testing.assert_allclose(model.predict_proba(x[5]), proba[5], rtol=1e-6)


def test_explicit_test_set_and_seeded_runs_repeat(blobs):
    x, y = blobs
    a, ma = ffwd.train_classifier(x[:500], y[:500], layer="ufff", depth=3, trees=2, epochs=5, x_test=x[500:], y_test=y[500:])
    b, mb = ffwd.train_classifier(x[:500], y[:500], layer="ufff", depth=3, trees=2, epochs=5, x_test=x[500:], y_test=y[500:])
    assert ma["test_samples"] == 100 and ma["test_accuracy"] == mb["test_accuracy"]
    np.testing.assert_array_equal(a.logits(x), b.logits(x))
    assert a.neurons_per_inference == 2 * 4


def test_save_load_round_trip(blobs, tmp_path):
    x, y = blobs
    model, _ = ffwd.train_classifier(x, y, layer="moe", experts=4, expert_width=4, top_k=2, epochs=3)
    path = tmp_path / "m.safetensors"
    model.save(path)
    back = ffwd.Classifier.load(str(path))
    np.testing.assert_array_equal(back.logits(x), model.logits(x))
    assert back.config == model.config


def test_bf16_weights(blobs, tmp_path):
    # bf16 weight matrices: the predictions of the f32 model, logits within the rounding
    x, y = blobs
    for layer, extra in [("dense", dict(width=32)), ("fff", dict(depth=2)), ("moe", dict(experts=4, expert_width=8, top_k=2))]:
        model, _ = ffwd.train_classifier(x, y, layer=layer, epochs=10, seed=4, **extra)
        path = tmp_path / f"{layer}.safetensors"
        model.save(path)
        half = ffwd.Classifier.load(path, bf16=True)
        full = model.logits(x)
        diff = np.abs(half.logits(x) - full).max()
        assert 0 < diff < 0.05 * np.abs(full).max(), (layer, diff)
        assert (half.predict(x) == model.predict(x)).mean() > 0.98
    model, _ = ffwd.train_classifier(x, y, layer="glu", epochs=1)
    model.save(tmp_path / "glu.safetensors")
    with pytest.raises(ValueError, match="bf16.*glu"):
        ffwd.Classifier.load(tmp_path / "glu.safetensors", bf16=True)


def test_predictions_equal_the_cli(tmp_path, ffwd_bin):
    model_path = tmp_path / "digits.safetensors"
    subprocess.run([ffwd_bin, "train", "--layer", "fff", "--depth", "2", "--epochs", "3", "--save", model_path, "--quiet"], check=True, capture_output=True)
    model = ffwd.Classifier.load(model_path)
    x = np.random.default_rng(3).uniform(0, 16, size=(40, 64)).astype(np.float32)
    rows = tmp_path / "rows.txt"
    np.savetxt(rows, x, delimiter=",", fmt="%.9g")
    out = subprocess.run([ffwd_bin, "predict", "--model", model_path, "--input", rows], check=True, capture_output=True, text=True).stdout
    cli = np.array([int(v) for v in out.split()])
    np.testing.assert_array_equal(model.predict(x), cli)


def test_bad_input_raises_with_one_line_messages(blobs, tmp_path):
    x, y = blobs
    model, _ = ffwd.train_classifier(x, y, epochs=1)
    cases = [
        (x.astype(np.float64), TypeError, "dtype float32"),
        (x[:, :5].copy(), ValueError, "axis `features` expected 8, got 5"),
        (np.asfortranarray(x), ValueError, "C-contiguous"),
        (x[::2], ValueError, "C-contiguous"),
        (x.reshape(2, 300, 8), ValueError, "1 or 2 axes"),
        (np.zeros((0, 8), np.float32), ValueError, "empty batch"),
        ([[0.0] * 8], TypeError, "numpy.ndarray"),
    ]
    nan = x.copy()
    nan[3, 2] = np.nan
    cases.append((nan, ValueError, "non-finite value at row 3, column 2"))
    for bad, kind, words in cases:
        with pytest.raises(kind) as e:
            model.predict(bad)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        ffwd.Classifier.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError):
        ffwd.Classifier.load(garbage)
    with pytest.raises(ValueError, match="unknown field `epoch`"):
        ffwd.train_classifier(x, y, epoch=3)
    with pytest.raises(ValueError, match="depth applies to fff or ufff"):
        ffwd.train_classifier(x, y, layer="dense", depth=3)
    with pytest.raises(ValueError, match="axis `rows` expected 600, got 10"):
        ffwd.train_classifier(x, y[:10])
    with pytest.raises(TypeError, match="integer class labels"):
        ffwd.train_classifier(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="not in 0"):
        ffwd.train_classifier(x, -np.ones(600, np.int64))


def test_threads_are_settable_and_compute_runs_off_the_gil(blobs):
    import threading

    x, y = blobs
    model, _ = ffwd.train_classifier(x, y, epochs=1)
    want = model.predict(x)
    ffwd.set_threads(1)
    try:
        assert ffwd.threads() == 1
        np.testing.assert_array_equal(model.predict(x), want)
    finally:
        ffwd.set_threads(0)
    results = []
    workers = [threading.Thread(target=lambda: results.append(model.predict(x))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 4 and all((r == want).all() for r in results)


def test_quantized_checkpoints_load_and_predict(blobs, tmp_path):
    x, y = blobs
    model, _ = ffwd.train_classifier(x, y, layer="dense", width=64, epochs=20, seed=2)
    path, q8, q4 = tmp_path / "m.safetensors", tmp_path / "q8.safetensors", tmp_path / "q4.safetensors"
    model.save(path)
    report = ffwd.quantize(path, q8)
    assert report["format"] == "q8_0" and report["quantized"] == ["ffn.fc2.weight"] and report["bytes_after"] < report["bytes_before"]
    ffwd.quantize(path, q4, format="q4_0")
    base = (model.predict(x) == y).mean()
    for p in (q8, q4):
        back = ffwd.Classifier.load(p)
        assert abs((back.predict(x) == y).mean() - base) <= 0.02
        assert np.abs(back.logits(x) - model.logits(x)).max() < 0.5
    with pytest.raises(ValueError, match="quantized already"):
        ffwd.quantize(q8, tmp_path / "again.safetensors")
    with pytest.raises(ValueError, match="q5_1"):
        ffwd.quantize(path, tmp_path / "x.safetensors", format="q5_1")
