"""ffwd layers as PyTorch inference modules (import this module only when torch is installed).

    >>> import ffwd.torch
    >>> model.ffn = ffwd.torch.from_fastfeedforward(model.ffn)   # a drop-in replacement

Inputs of any leading shape ``(..., in_features)`` are flattened to rows; a CPU float32
contiguous input is handed to ffwd without a copy, and the output array becomes the output
tensor without a copy. No gradient flows through these modules.
"""

from __future__ import annotations

from typing import Any

import torch

from . import layers

__all__ = ["Module", "from_fastfeedforward", "from_ultrafastbert"]


class Module(torch.nn.Module):
    """Wraps an :mod:`ffwd.layers` layer as an inference ``torch.nn.Module``."""

    def __init__(self, layer: Any):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.detach()
        if rows.device.type != "cpu" or rows.dtype != torch.float32:
            rows = rows.to("cpu", torch.float32)
        rows = rows.reshape(-1, rows.shape[-1]).contiguous()
        y = torch.from_numpy(self.layer.forward(rows.numpy()))
        return y.reshape(*lead, y.shape[-1]).to(x.device)

    def extra_repr(self) -> str:
        return repr(self.layer)


def from_fastfeedforward(module: Any, activation: str | None = None) -> Module:
    """A ``fastfeedforward.FFF`` as an ffwd inference module (see :class:`ffwd.layers.FFF`)."""
    return Module(layers.FFF.from_fastfeedforward(module, activation))


def from_ultrafastbert(state: Any, prefix: str = "", trees: int = 1) -> Module:
    """An UltraFastBERT tree layer as an ffwd inference module (see
    :class:`ffwd.layers.UltraFastTree`)."""
    return Module(layers.UltraFastTree.from_state_dict(state, prefix, trees))
