"""Language model: train, generate, save/load, errors."""

import numpy as np
import pytest

import ffwd

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def small(**extra):
    return {**dict(d_model=16, heads=2, layers=1, context=16, steps=30, batch=4, eval_every=15, eval_batches=2), **extra}


def test_train_generate_save_load(tmp_path):
    lm, metrics = ffwd.train_lm(TEXT, **small(ffn="ufff", depth=2, trees=2))
    assert metrics["steps"] == 30 and metrics["val_loss"] is not None
    assert metrics["model"]["ffn"]["trees"] == 2
    assert set(lm.vocab) == set(TEXT)
    out = lm.generate("the ", max_tokens=40, temperature=0.8, seed=3)
    assert len(out) == 40 and set(out) <= set(TEXT)
    assert lm.generate("the ", 40, 0.8, 0, 3) == out  # seeded
    path = tmp_path / "lm.safetensors"
    lm.save(path)
    back = ffwd.LM.load(path)
    assert back.generate("the ", max_tokens=40, temperature=0.8, seed=3) == out
    assert back.config == lm.config
    # the FFN blocks on bf16 weights: text from the same vocabulary, greedy decoding mostly as f32
    half = ffwd.LM.load(path, bf16=True)
    greedy = back.generate("the ", max_tokens=40, temperature=0.0)
    out16 = half.generate("the ", max_tokens=40, temperature=0.0)
    assert len(out16) == 40 and set(out16) <= set(TEXT)


def test_text_from_a_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    a, _ = ffwd.train_lm(path, **small())
    b, _ = ffwd.train_lm(str(path), **small())
    assert a.generate("t", 20, 0.0) == b.generate("t", 20, 0.0)


def test_errors():
    lm, _ = ffwd.train_lm(TEXT, **small(steps=2))
    with pytest.raises(ValueError, match="Z"):
        lm.generate("Zebra")
    with pytest.raises(ValueError, match="temperature"):
        lm.generate("the", temperature=-1.0)
    with pytest.raises(ValueError, match="unknown option `stepz`"):
        ffwd.train_lm(TEXT, stepz=3)
    with pytest.raises(ValueError, match="trees applies to ffn ufff"):
        ffwd.train_lm(TEXT, **small(ffn="dense", trees=2))
    with pytest.raises(FileNotFoundError):
        ffwd.LM.load("/nonexistent/lm.safetensors")


def test_self_guided_structured_ffn(tmp_path):
    lm, metrics = ffwd.train_lm(TEXT, **small(ffn="blockdense", rank=8, blocks=2, guided=0.5, reduce_flop=True))
    assert metrics["model"]["ffn"]["guide"] == {"fraction": 0.5, "reduce_flop": True}
    # the guides were dropped when their phase ended: the saved model is the plain structure
    path = tmp_path / "g.safetensors"
    lm.save(path)
    back = ffwd.LM.load(path)
    assert back.generate("the ", 20, 0.0) == lm.generate("the ", 20, 0.0)
    with pytest.raises(ValueError, match="guided applies to ffn lowrank, blockdense or blockshuffle"):
        ffwd.train_lm(TEXT, **small(ffn="dense", guided=0.5))


def test_bf16_products():
    # mixed precision is an option like any other; where the CPU lacks AVX512_BF16 it is
    # refused by name (never silently run as f32)
    try:
        lm, metrics = ffwd.train_lm(TEXT, **small(d_model=64, batch=8, precision="bf16"))
    except ValueError as e:
        assert "AVX512_BF16" in str(e)
    else:
        assert metrics["train"]["precision"] == "bf16" and metrics["val_loss"] is not None
    with pytest.raises(ValueError, match="f16"):
        ffwd.train_lm(TEXT, **small(precision="f16"))
