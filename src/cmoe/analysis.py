"""Activation analysis of one FFN on calibration tokens (method.md section 2).

Scores use L2-normalised vectors so that neurons with large weight norms do not win by scale::

    s_i(x) = act(<x/|x|, g_i/|g_i|>) * <x/|x|, u_i/|u_i|>

ATopK markers are kept compactly as the K_a marked neuron ids per token ([T, K_a]) instead of
the dense T x f matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import activations
from .families import FFNWeights


class CalibrationError(ValueError):
    """The calibration activations cannot be used (NaN/inf, empty, ...)."""


@dataclass
class Markers:
    topk_idx: torch.Tensor  # [T, K] int64, the K_a most active neurons of each token
    rates: torch.Tensor  # [f] float32, activation rate mu_i = mean over tokens of M[:, i]

    @property
    def num_tokens(self) -> int:
        return self.topk_idx.shape[0]


def activation_scores(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """x [T, d] -> normalised activation scores [T, f] (float32)."""
    xn = F.normalize(x.float(), dim=-1)
    g = xn @ F.normalize(w.gate.float(), dim=-1).T
    u = xn @ F.normalize(w.up.float(), dim=-1).T
    return activations.apply(w.act, g) * u


def check_activations(x: torch.Tensor) -> None:
    """Refuse empty or non-finite calibration inputs x [T, d] with a clear error."""
    if x.shape[0] == 0:
        raise CalibrationError("no calibration tokens reached this layer")
    if not torch.isfinite(x).all():
        raise CalibrationError(
            "calibration activations contain NaN or inf; the model overflows in its dtype: "
            "convert in float32 (--dtype float32) or check the weights"
        )


def atopk_markers(x: torch.Tensor, w: FFNWeights, k_act: int, chunk: int = 4096) -> Markers:
    """ATopK: per token, mark the k_act neurons with the largest |s_i|; chunked over tokens."""
    check_activations(x)
    f = w.intermediate_size
    idx = torch.cat(
        [activation_scores(xc, w).abs().topk(k_act, dim=-1).indices for xc in x.split(chunk)]
    )  # [T, K]
    rates = torch.bincount(idx.reshape(-1), minlength=f).float() / x.shape[0]
    return Markers(idx, rates)
