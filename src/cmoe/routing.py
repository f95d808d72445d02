"""Fitted routers and router quality (issue 5, beyond the paper's analytical router).

- :func:`expert_output_norms`: the oracle's scores, ``|E_j(x)|`` for every routed expert j.
- :func:`fit_linear_router`: closed-form ridge regression ``x -> |E_j(x)|`` on the calibration
  tokens; its weight is a plain ``LinearRouter`` (``scores = W x``, then the same softmax,
  top-a and weights ``1 + p * v`` as every router), the layout standard MoE checkpoints and
  serving engines expect.
- :func:`topk_agreement`: how often a router's top-a set overlaps the oracle's top-a set.
"""

from __future__ import annotations

import torch

from . import activations


@torch.no_grad()
def expert_output_norms(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: str,
                        chunk: int = 4096) -> torch.Tensor:
    """x [T, d], gate_up [E, 2m, d], down [E, d, m] -> |E_j(x)| [T, E] float32."""
    E = gate_up.shape[0]
    out = []
    for xc in x.float().split(chunk):
        cols = []
        for j in range(E):
            g, u = (xc @ gate_up[j].float().T).chunk(2, dim=-1)
            cols.append((activations.apply(act, g) * u) @ down[j].float().T)  # [t, d]
        out.append(torch.stack([c.norm(dim=-1) for c in cols], dim=1))  # [t, E]
    return torch.cat(out)


@torch.no_grad()
def fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W [E, d] minimising |x W^T - y|^2 + lam |W|^2, lam = ridge * trace(x^T x) / d (float64 solve)."""
    x64 = x.double()
    gram = x64.T @ x64  # [d, d]
    lam = ridge * gram.diagonal().mean()
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, x64.T @ y.double()).T.float()  # [E, d]


@torch.no_grad()
def fit_linear_router(x: torch.Tensor, norms: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Ridge fit of the per-expert output norms ``norms [T, E]`` from the FFN input ``x [T, d]``.

    Only the ranking of the experts within a token matters for top-a, so each token's targets
    are centred (a per-token constant changes no ranking) and divided by their mean, so that
    tokens of every scale weigh alike. Returns the ``LinearRouter`` weight [E, d]."""
    y = norms.float()
    scale = y.mean(1, keepdim=True).clamp_min(1e-6)
    y = (y - y.mean(1, keepdim=True)) / scale
    return fit_ridge(x.float() / scale, y, ridge)


@torch.no_grad()
def topk_agreement(scores: torch.Tensor, oracle: torch.Tensor, a: int) -> float:
    """Mean over tokens of |top-a(scores) & top-a(oracle)| / a (1 = the oracle's choice)."""
    if a == 0 or scores.shape[1] == 0:
        return 1.0
    E = scores.shape[1]
    pick = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(a, dim=1).indices, True)
    best = torch.zeros(oracle.shape, dtype=torch.bool, device=oracle.device).scatter_(1, oracle.topk(a, dim=1).indices, True)
    return ((pick & best).sum(1).float() / a).mean().item() if E else 1.0
