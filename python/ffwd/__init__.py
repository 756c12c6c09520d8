"""ffwd: feedforward networks and their conditional-computation variants on CPUs.

Train, save, load and run ffwd models from NumPy; run trained ``fastfeedforward`` and
UltraFastBERT layers through ffwd's conditional kernels (:mod:`ffwd.layers`), also inside a
PyTorch model (:mod:`ffwd.torch`, imported only when you import it).

    >>> import numpy as np, ffwd
    >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int64)
    >>> model, metrics = ffwd.train_classifier(x, y, layer="fff", depth=2, epochs=20)
    >>> model.predict(x[:3]).shape
    (3,)

Arrays are float32 and C-contiguous (anything else raises ``TypeError`` or ``ValueError``
with a one-line message); the GIL is released while ffwd computes; :func:`set_threads`
chooses how many threads it uses.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from . import _ffwd, layers
from ._ffwd import LM, Classifier, Forecaster, Kernel, __version__, set_threads, threads

__all__ = ["Classifier", "LM", "Forecaster", "Kernel", "train_classifier", "train_lm", "train_forecaster", "quantize", "set_threads", "threads", "layers", "__version__"]


def quantize(path: Union[str, os.PathLike], out: Union[str, os.PathLike], format: str = "q8_0", experts_only: bool = False) -> Dict[str, Any]:
    """Writes ``out``: the checkpoint at ``path`` with its weight matrices stored as ggml
    ``q8_0`` or ``q4_0`` blocks (``ffwd convert quantize``). ``experts_only`` quantizes only
    the FFN/expert weights (MoQE). ``Classifier.load``/``LM.load`` read the result and run the
    quantized kernels. Returns the report (tensors quantized and kept, bytes before/after)."""
    import json

    return json.loads(_ffwd.quantize(os.fspath(path), os.fspath(out), format, experts_only))


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    layer: str = "dense",
    *,
    x_test: Optional[np.ndarray] = None,
    y_test: Optional[np.ndarray] = None,
    verbose: bool = False,
    **options: Any,
) -> Tuple[Classifier, Dict[str, Any]]:
    """Trains a classifier with one ffwd layer between the input and the softmax.

    x: float32 array, samples × features. y: integer labels 0..classes-1.
    layer: ``dense``, ``glu`` (gated; ``activation`` silu/gelu/relu = SwiGLU/GEGLU/ReGLU),
    ``lowrank``, ``blockdense``, ``blockshuffle``, ``deq``, ``fff``, ``ufff``, ``moe``, ``smoe`` or ``pkm``.
    x_test, y_test: the test set; without them a seeded ``holdout`` share (0.2) of x is held out.
    options: any key of ``ffwd train``'s TOML configuration (``epochs``, ``batch``, ``lr``,
    ``seed``, ``optimizer``, ``weight_decay``, a layer table such as ``fff={"hardening": 1}``,
    ``grad_noise``) and the layer shorthands ``width``, ``depth``, ``trees``, ``rank``,
    ``leaf``, ``experts``, ``expert_width``, ``top_k``, ``activation``, ``dense_layers``.
    Unknown keys raise ``ValueError``.

    Returns the trained :class:`Classifier` and a metrics dict (``test_accuracy``,
    ``train_accuracy``, ``history``, ``config``, ...).
    """
    return _ffwd.train_classifier(x, y, x_test, y_test, verbose, layer=layer, **options)


def train_lm(text: Union[str, os.PathLike], *, verbose: bool = False, **options: Any) -> Tuple[LM, Dict[str, Any]]:
    """Trains a character-level transformer language model.

    text: the training text, or a path to a UTF-8 file (a ``pathlib.Path``, or a one-line
    ``str`` naming an existing file). Its last ``val_fraction`` (0.1) is held out.
    options: ``[model]`` keys (``context``, ``d_model``, ``heads``, ``layers``, ``parallel``),
    ``[train]`` keys (``steps``, ``batch``, ``lr``, ``seed``, ...) and the FFN shorthands
    (``ffn`` = dense, dense3, swiglu, geglu, reglu, lowrank, blockdense, blockshuffle, fff, ufff,
    moe, smoe, hash, pkm or channelidle; ``ffn_width``, ``depth``, ``trees``, ``rank``, ``blocks``,
    ``experts``, ``top_k``, ``balanced_hash``, ``first_dense``, ``guided`` (self-guided training of
    lowrank/blockdense/blockshuffle over this share of the steps) and ``reduce_flop``).

    Returns the trained :class:`LM` and a metrics dict (``val_loss``, ``val_bpc``, ``history``, ...).
    """
    if isinstance(text, os.PathLike) or (isinstance(text, str) and "\n" not in text and len(text) < 4096 and os.path.isfile(text)):
        text = pathlib.Path(text).read_text(encoding="utf-8")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str or a path, got {type(text).__name__}")
    return _ffwd.train_lm(text, verbose, **options)


def train_forecaster(
    data: Union[str, os.PathLike, np.ndarray],
    *,
    column: Optional[str] = None,
    fill: str = "none",
    verbose: bool = False,
    **options: Any,
) -> Tuple[Forecaster, Dict[str, Any]]:
    """Trains an AR-Net forecaster (Triebe et al. 2019) on one series.

    data: a CSV file (timestamps in the first column; ``column`` picks the values, default the
    last; ``fill="linear"`` interpolates missing values, else they are an error), or a 1-D
    float32 array (its positions are the time axis).
    options: the keys of ``ffwd forecast train``: ``lags``, ``horizon``, ``sparsity``,
    ``epochs``, ``batch``, ``lr``, ``weight_decay``, ``season``, ``val_fraction``,
    ``test_fraction``, ``keep_best``, ``seed``, ...; ``ffn`` (a layer kind for an FFN next to
    the linear AR map) with the layer shorthands (``width``, ``depth``, ``activation``, ...).

    Returns the trained :class:`Forecaster` (``forecast(history)`` gives the next ``horizon``
    values) and a dict with the options and the report (MAE, RMSE and MASE per split for the
    model, seasonal-naive and least-squares AR; the lags kept; AIC/BIC orders; history).
    """
    if isinstance(data, np.ndarray):
        return _ffwd.train_forecaster(None, data, column, fill, verbose, **options)
    if isinstance(data, (str, os.PathLike)):
        return _ffwd.train_forecaster(os.fspath(data), None, column, fill, verbose, **options)
    raise TypeError(f"data must be a CSV path or a 1-D numpy array, got {type(data).__name__}")
