"""Activation functions of gated FFNs, by the names Hugging Face configs use.

Every supported family's FFN computes ``act(W_gate x) * (W_up x)``; this registry maps the
config's activation name to one canonical name and its torch function. Kernels switch on
the canonical name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# canonical name -> function
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
}

# names found in Hugging Face configs -> canonical name
ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def canonical(name: str) -> str:
    """Canonical activation name for a config's ``hidden_act`` value."""
    try:
        return ALIASES[name]
    except KeyError:
        raise ValueError(
            f"unsupported FFN activation {name!r}; supported: {sorted(ALIASES)}"
        ) from None


def apply(name: str, x: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[canonical(name)](x)
