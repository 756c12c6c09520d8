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
from ._ffwd import LM, Classifier, Kernel, __version__, set_threads, threads

__all__ = ["Classifier", "LM", "Kernel", "train_classifier", "train_lm", "set_threads", "threads", "layers", "__version__"]


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
    ``lowrank``, ``fff``, ``ufff``, ``moe``, ``smoe`` or ``pkm``.
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
    (``ffn`` = dense, dense3, swiglu, geglu, reglu, lowrank, fff, ufff, moe, smoe, hash or pkm;
    ``ffn_width``, ``depth``, ``trees``, ``rank``, ``experts``, ``top_k``, ``balanced_hash``).

    Returns the trained :class:`LM` and a metrics dict (``val_loss``, ``val_bpc``, ``history``, ...).
    """
    if isinstance(text, os.PathLike) or (isinstance(text, str) and "\n" not in text and len(text) < 4096 and os.path.isfile(text)):
        text = pathlib.Path(text).read_text(encoding="utf-8")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str or a path, got {type(text).__name__}")
    return _ffwd.train_lm(text, verbose, **options)
