"""Trained PyTorch layers through ffwd's conditional (hard-routing) inference kernels.

    >>> import ffwd
    >>> fast = ffwd.layers.FFF.from_fastfeedforward(fff_module)   # a fastfeedforward.FFF
    >>> y = fast.forward(x)                                        # x: float32, batch × in

Inference only: the kernels hold a copy of the weights and take float32 C-contiguous arrays.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import _ffwd

__all__ = ["FFF", "UltraFastTree"]

_ACTIVATIONS = {"ReLU": "relu", "GELU": "gelu", "SiLU": "silu"}


def _to_numpy(value: Any) -> np.ndarray:
    """A tensor or array as NumPy: floating ones as float32 C-contiguous, others as they are."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.contiguous().numpy()
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
        value = np.ascontiguousarray(value, dtype=np.float32)
    return value


def _state(source: Any) -> dict:
    if hasattr(source, "state_dict"):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a torch module or a state dict, got {type(source).__name__}")
    return {str(k): _to_numpy(v) for k, v in source.items()}


class _KernelLayer:
    """Shared surface of the converted layers."""

    def __init__(self, kernel: _ffwd.Kernel):
        self._kernel = kernel

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x`` (float32, ``batch × in_features``, C-contiguous; 1-D = one sample) →
        ``batch × out_features`` through the conditional kernel."""
        return self._kernel.forward(x)

    __call__ = forward

    @property
    def in_features(self) -> int:
        """Input width."""
        return self._kernel.in_features

    @property
    def out_features(self) -> int:
        """Output width."""
        return self._kernel.out_features

    @property
    def neurons_per_inference(self) -> int:
        """Hidden neurons one sample evaluates."""
        return self._kernel.neurons_per_inference

    def __repr__(self) -> str:
        return repr(self._kernel)


class FFF(_KernelLayer):
    """A Fast Feedforward layer (Belcak & Wattenhofer 2023) at inference: each sample descends
    the node tree by the sign of its node logits and evaluates one leaf MLP."""

    @classmethod
    def from_fastfeedforward(cls, module: Any, activation: str | None = None) -> "FFF":
        """From a ``fastfeedforward.FFF`` module or its state dict.

        The leaf output bias ``b2s`` is included, as in the paper; ``fastfeedforward`` 0.2.1's
        ``eval_forward`` drops it, so outputs equal ``eval_forward(x) + b2s[leaf]``.
        ``activation`` defaults to the module's own (ReLU, GELU or SiLU) or, for a state dict,
        the package default ``relu``.
        """
        if activation is None:
            act = getattr(module, "activation", None)
            name = type(act).__name__ if act is not None else "ReLU"
            if name not in _ACTIVATIONS or getattr(act, "approximate", "none") != "none":
                raise ValueError(f"activation {name} has no ffwd kernel (ReLU, GELU, SiLU)")
            activation = _ACTIVATIONS[name]
        return cls(_ffwd.fff_kernel(_state(module), activation))


class UltraFastTree(_KernelLayer):
    """UltraFastBERT's tree layer (Belcak & Wattenhofer 2023, arXiv 2311.10770) at inference:
    K parallel trees of single neurons, D + 1 neurons per tree and sample."""

    @classmethod
    def from_state_dict(cls, state: Any, prefix: str = "", trees: int = 1, activation: str = "gelu") -> "UltraFastTree":
        """From UltraFastBERT's layout: ``{prefix}linear_in.weight`` (K·n × in) with
        ``{prefix}linear_in.bias``, and ``{prefix}linear_out.weight`` (out × K·n, no bias),
        n = 2^(D+1) − 1; the depth follows from the shapes and ``trees`` (K, the "K" of
        UltraFastBERT's "KxD" configurations). ``state`` may also be the module itself."""
        return cls(_ffwd.ufff_kernel(_state(state), prefix, trees, activation))
