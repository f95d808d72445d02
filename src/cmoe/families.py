"""Model families: how each architecture's gated FFN is read.

A registry from Hugging Face ``model_type`` to an :class:`FFNFamily`. Adding a family with a
gated FFN is one ``register(...)`` line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import activations


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be converted; the message lists what can."""


@dataclass(frozen=True)
class FFNWeights:
    gate: torch.Tensor  # [f, d]
    up: torch.Tensor  # [f, d]
    down: torch.Tensor  # [d, f]
    act: str  # canonical activation

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]


@dataclass(frozen=True)
class FFNFamily:
    """``fused_gate_up``: one ``gate_up_proj`` [2f, d] (gate first, Phi-3) instead of two.

    ``post_ffn_norm`` / ``ffn_multiplier``: what the decoder layer applies to the FFN output
    before the residual add (Gemma 2/3, OLMo2: a norm; Granite: a scalar). Both map 0 to 0,
    which the conversion pipeline relies on (see ``ffn_residual``).
    """

    fused_gate_up: bool = False
    mlp_attr: str = "mlp"
    post_ffn_norm: str | None = None
    ffn_multiplier: str | None = None

    def ffn_residual(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """What the layer adds to its residual stream for FFN output y."""
        if self.post_ffn_norm:
            y = getattr(layer, self.post_ffn_norm)(y)
        if self.ffn_multiplier:
            y = y * getattr(layer, self.ffn_multiplier)
        return y

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def read(self, mlp: nn.Module, config) -> FFNWeights:
        for name, lin in mlp.named_children():
            if isinstance(lin, nn.Linear) and lin.bias is not None:
                raise UnsupportedModelError(f"FFN projection {name!r} has a bias; biased FFNs are not supported")
        if self.fused_gate_up:
            gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        else:
            gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        return FFNWeights(gate, up, mlp.down_proj.weight, activation_of(config))


FAMILIES: dict[str, FFNFamily] = {}


def register(model_types: list[str], family: FFNFamily) -> None:
    for t in model_types:
        FAMILIES[t] = family


register(["llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3"], FFNFamily())
register(["gemma2", "gemma3_text", "olmo2"], FFNFamily(post_ffn_norm="post_feedforward_layernorm"))
register(["granite"], FFNFamily(ffn_multiplier="residual_multiplier"))
register(["phi3"], FFNFamily(fused_gate_up=True))


def activation_of(config) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name is None:
        raise UnsupportedModelError(f"{config.model_type}: config names no FFN activation")
    return activations.canonical(name)


def family_of(config) -> FFNFamily:
    model_type = getattr(config, "model_type", None)
    base = model_type.removeprefix("cmoe_") if model_type else None
    try:
        return FAMILIES[base]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: CMoE needs a gated FFN "
            f"(act(W_gate x) * W_up x, then W_down). Supported model types: {', '.join(sorted(FAMILIES))}"
        ) from None
