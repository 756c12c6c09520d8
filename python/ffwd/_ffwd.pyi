"""Type stubs of the Rust extension `ffwd._ffwd` (the public API is re-exported by `ffwd`)."""

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, os.PathLike]
_F32 = npt.NDArray[np.float32]

class Classifier:
    """A trained classifier (any ffwd layer between the input and the softmax)."""

    @staticmethod
    def load(path: _Path, bf16: bool = False) -> "Classifier":
        """Loads a checkpoint written by `save` or `ffwd train --save`; `bf16=True` runs
        inference on the layer's weight matrices rounded to bfloat16 (dense, ufff, fff
        leaves, moe/smoe/moefied experts; other layers raise)."""
    def save(self, path: _Path) -> None:
        """Saves the model (weights and configuration) as safetensors."""
    def predict(self, x: _F32) -> npt.NDArray[np.int64]:
        """Predicted class of each row of `x` (float32, batch × in_features) as int64."""
    def predict_proba(self, x: _F32) -> _F32:
        """Class probabilities of each row of `x`: float32, batch × n_classes."""
    def logits(self, x: _F32) -> _F32:
        """Inference logits of each row of `x`: float32, batch × n_classes."""
    @property
    def in_features(self) -> int: ...
    @property
    def n_classes(self) -> int: ...
    @property
    def layer(self) -> str: ...
    @property
    def param_count(self) -> int: ...
    @property
    def neurons_per_inference(self) -> int: ...
    @property
    def config(self) -> Dict[str, Any]: ...

class LM:
    """A character-level transformer language model with its vocabulary."""

    @staticmethod
    def load(path: _Path, bf16: bool = False) -> "LM":
        """Loads a checkpoint written by `save` or `ffwd lm train --save`; `bf16=True` runs
        the FFN blocks on bfloat16 weight matrices (attention and embeddings stay f32)."""
    def save(self, path: _Path) -> None:
        """Saves the model, vocabulary, options and optimizer state."""
    def generate(self, prompt: str, max_tokens: int = 200, temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
        """Continues `prompt` by `max_tokens` characters."""
    @property
    def vocab(self) -> str: ...
    @property
    def param_count(self) -> int: ...
    @property
    def config(self) -> Dict[str, Any]: ...

class Kernel:
    """An immutable inference kernel of one layer."""

    def forward(self, x: _F32) -> _F32:
        """`x` (float32, batch × in_features, C-contiguous) → batch × out_features."""
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def neurons_per_inference(self) -> int: ...

def train_classifier(
    x: _F32, y: npt.ArrayLike, x_test: Optional[_F32] = None, y_test: Optional[npt.ArrayLike] = None, verbose: bool = False, **options: Any
) -> Tuple[Classifier, Dict[str, Any]]: ...
def train_lm(text: str, verbose: bool = False, **options: Any) -> Tuple[LM, Dict[str, Any]]: ...
def fff_kernel(state: Mapping[str, np.ndarray], activation: str = "relu") -> Kernel: ...
def ufff_kernel(state: Mapping[str, np.ndarray], prefix: str = "", trees: int = 1, activation: str = "gelu") -> Kernel: ...
def set_threads(n: int) -> None:
    """Sets the number of threads ffwd computes with (0 = one per core)."""
def threads() -> int:
    """The number of threads ffwd computes with."""

class Forecaster:
    """An AR-Net forecaster (linear AR with AR-Net's sparsity, plus an optional FFN)."""

    @staticmethod
    def load(path: Union[str, "os.PathLike[str]"]) -> "Forecaster": ...
    def save(self, path: Union[str, "os.PathLike[str]"]) -> None: ...
    def forecast(self, history: _F32) -> _F32:
        """The next `horizon` values after `history` (1-D float32; its last `lags` values are read)."""
    @property
    def config(self) -> Dict[str, Any]: ...

def train_forecaster(
    path: Optional[str] = None, values: Optional[_F32] = None, column: Optional[str] = None, fill: str = "none", verbose: bool = False, **options: Any
) -> Tuple[Forecaster, Dict[str, Any]]: ...

def quantize(path: str, out: str, format: str = "q8_0", experts_only: bool = False) -> str: ...
