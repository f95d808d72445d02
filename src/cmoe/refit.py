"""Closed-form refit of the down projections given the routing (issue 5, beyond the paper).

Once a layer is partitioned and its router fixed, each calibration token x uses only the
neurons of the shared expert and of its chosen experts. The down projections were copied from
the dense FFN, which was fitted with *every* neuron present; with some of them absent, a better
down projection exists, and it has a closed form. With ``H [T, f]`` the neuron activations
``act(W_gate x) * (W_up x)`` in the CMoE layout, ``M`` the routing mask (1 for the shared
neurons and the chosen experts' neurons, times their router weight), ``W [d, f]`` the copied down
projections and ``Y = H W^T`` the dense FFN outputs, the refit solves the ridge problem

    min_dW |Y - (H * M) (W + dW)^T|^2 + lam |dW|^2,   lam = ridge * mean diag((H*M)^T (H*M))

so ``W + dW`` is the least-squares down projection for the neurons each token really uses
(neurons that cover for absent ones take a share of their output). Only down weights change:
the layer keeps its layout, router and kernels; when every expert is chosen, ``M`` is all ones,
the residual is zero and ``dW = 0`` exactly (the all-active == dense invariant holds). No
gradient descent: one [f, f] linear solve per layer.

With ``stream`` > 0 the target moves part of the way from ``Y`` to what the layer must add to
its converted residual stream to reproduce the dense model's next hidden state (the dense and
converted streams are run side by side during the conversion): the refit then also absorbs
the part of the upstream error that the layer's used neurons can predict. When every expert
is active the two streams coincide and the target is still ``Y``.
"""

from __future__ import annotations

import torch

from . import activations
from .moe import CMoEMLP


@torch.no_grad()
def masked_activations(moe: CMoEMLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] -> (H [T, f], H * M [T, f]) in float32, columns in the CMoE layout
    (shared neurons, then expert 0, 1, ...; ``moe.neuron_index`` maps them to the dense ids)."""
    spec = moe.spec
    x = x.float()
    cols = []
    if spec.shared_size:
        g, u = (x @ moe.shared_gate_up.weight.float().T).chunk(2, dim=-1)
        cols.append(activations.apply(spec.act, g) * u)
    T, E, m = x.shape[0], spec.num_experts, spec.expert_size
    if E:
        gu = torch.einsum("td,end->ten", x, moe.experts.gate_up_proj.float())  # [T, E, 2m]
        g, u = gu.split(m, dim=-1)
        cols.append((activations.apply(spec.act, g) * u).reshape(T, E * m))
    h = torch.cat(cols, dim=1)
    mask = torch.ones_like(h)
    if E:
        routed = torch.zeros(T, E, device=x.device)
        if spec.top_k:
            idx, weight, _ = moe.route(x)
            routed.scatter_(1, idx, weight.float())
        mask[:, spec.shared_size:] = routed.repeat_interleave(m, dim=1)
    return h, h * mask


def down_weights(moe: CMoEMLP) -> torch.Tensor:
    """The layer's down projections as one [d, f] matrix in the CMoE layout (float32)."""
    parts = []
    if moe.spec.shared_size:
        parts.append(moe.shared_down.weight.float())
    if moe.spec.num_experts:
        parts.append(moe.experts.down_proj.float().permute(1, 0, 2).reshape(moe.spec.hidden_size, -1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def set_down_weights(moe: CMoEMLP, w: torch.Tensor) -> None:
    spec = moe.spec
    ms = spec.shared_size
    if ms:
        moe.shared_down.weight.copy_(w[:, :ms])
    if spec.num_experts:
        E, m = spec.num_experts, spec.expert_size
        moe.experts.down_proj.copy_(w[:, ms:].reshape(spec.hidden_size, E, m).permute(1, 0, 2))


@torch.no_grad()
def refit_down(
    moe: CMoEMLP, x: torch.Tensor, ridge: float = 0.6, toward: torch.Tensor | None = None, stream: float = 0.0,
    chunk: int = 4096,
) -> tuple[float, float]:
    """Refit ``moe``'s down projections on the calibration inputs x [T, d] (see the module doc).

    ``toward`` [T, d] and ``stream``: fit ``(1 - stream) Y + stream toward`` instead of the
    dense FFN's outputs ``Y``. The conversion passes as ``toward`` what this layer's FFN must
    add to its (converted) residual stream to reproduce the *dense* model's next hidden state,
    so that the refit also corrects the error that earlier layers left in the stream.
    Returns the relative error ``|target - Y_moe|^2 / |target|^2`` on x before and after."""
    spec = moe.spec
    f = spec.intermediate_size
    w = down_weights(moe)  # [d, f]
    gram = torch.zeros(f, f, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(f, spec.hidden_size, dtype=torch.float64, device=x.device)
    energy = resid_energy = 0.0
    towards = [None] * len(x.split(chunk)) if toward is None or stream == 0 else toward.float().split(chunk)
    for xc, tc in zip(x.split(chunk), towards):
        h, hm = masked_activations(moe, xc)
        yc = h @ w.T  # the dense FFN's output
        if tc is None:
            resid = (h - hm) @ w.T  # [t, d]: the target minus the layer's current output
        else:
            yc = yc + stream * (tc - yc)
            resid = yc - hm @ w.T
        gram += (hm.T @ hm).double()
        rhs += (hm.T @ resid).double()
        energy += yc.double().pow(2).sum().item()
        resid_energy += resid.double().pow(2).sum().item()
    before = resid_energy / max(energy, 1e-30)
    if resid_energy == 0:  # every neuron used on every token: nothing to refit
        return before, before
    lam = ridge * gram.diagonal().mean()
    delta = torch.linalg.solve(gram + lam * torch.eye(f, dtype=gram.dtype, device=gram.device), rhs)  # [f, d]
    # |R - Hm delta|^2 = |R|^2 - 2 <delta, Hm^T R> + <delta, (Hm^T Hm) delta>
    after = resid_energy - 2 * (delta * rhs).sum().item() + (delta * (gram @ delta)).sum().item()
    set_down_weights(moe, w + delta.T.float())
    return before, max(after, 0.0) / max(energy, 1e-30)
