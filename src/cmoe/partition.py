"""Magnitude-aware neuron partition (the "contrib" features; issue 5, beyond the paper).

The paper describes neuron i by its binary ATopK marker column. Here it is described by what it
actually adds to the FFN output on each calibration token::

    c_i(x) = |h_i(x)| * |W_down[:, i]|,      h(x) = act(W_gate x) * (W_up x)

- shared expert: the neurons with the largest mean energy ``E[c_i^2]`` (what dropping them
  always would cost, ignoring cross terms);
- routed experts: balanced k-means of the per-neuron feature columns ``c_i / |c_i|`` over the
  tokens (squared Euclidean distance, i.e. cosine on magnitudes), each step an exact balanced
  assignment (:func:`cmoe.clustering.balanced_assignment`), iterated until the assignment stops
  changing; initial centroids: the highest-energy candidates spread over a farthest-point pass.
  Neurons that carry output on the same tokens end up in the same expert, so choosing a few
  experts per token keeps most of the output energy.

Cohesion (reported per layer) = mean cosine between a member's feature column and its cluster
centroid (1 = every expert's neurons fire on exactly the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import activations
from .clustering import balanced_assignment
from .families import FFNWeights


@torch.no_grad()
def neuron_activations(x: torch.Tensor, w: FFNWeights, chunk: int = 4096) -> torch.Tensor:
    """h = act(W_gate x) * (W_up x): x [T, d] -> [T, f] float32 (chunked over tokens)."""
    g, u = w.gate.float(), w.up.float()
    return torch.cat([activations.apply(w.act, xc.float() @ g.T) * (xc.float() @ u.T) for xc in x.split(chunk)])


@torch.no_grad()
def contributions(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """c [T, f] = |h_i(x)| * |W_down[:, i]|: each neuron's output norm on each token."""
    return neuron_activations(x, w).abs_().mul_(w.down.float().norm(dim=0))


@dataclass
class FeaturePartition:
    shared: torch.Tensor  # [ms] neuron ids, ascending
    members: torch.Tensor  # [k, m] neuron ids of each routed expert, ascending
    cohesion: float
    iterations: int
    converged: bool


def split_shared(energy: torch.Tensor, n_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_shared neurons of highest ``energy [f]`` (ties: lower id) and the others, both ascending."""
    order = torch.argsort(energy, descending=True, stable=True)
    return order[:n_shared].sort().values, order[n_shared:].sort().values


def _init_centroids(feat: torch.Tensor, energy: torch.Tensor, k: int) -> torch.Tensor:
    """k starting centroids [k, T]: the highest-energy candidate, then repeatedly the candidate
    among the top half by energy farthest from the centroids chosen so far (deterministic)."""
    n = feat.shape[0]
    pool = torch.argsort(energy, descending=True, stable=True)[: max(k, n // 2)]
    chosen = [int(pool[0])]
    dist = 2 - 2 * feat[pool] @ feat[chosen[0]]  # [pool]
    for _ in range(1, k):
        j = int(pool[int(dist.argmax())])
        chosen.append(j)
        dist = torch.minimum(dist, 2 - 2 * feat[pool] @ feat[j])
    return feat[chosen].clone()


@torch.no_grad()
def balanced_feature_kmeans(
    feat: torch.Tensor, energy: torch.Tensor, k: int, iters: int | None = None, max_iters: int = 30
) -> tuple[torch.Tensor, float, int, bool]:
    """Balanced k-means of the rows of ``feat [n, T]`` (unit norm) into k clusters of n/k.

    Returns (labels [n], cohesion, iterations, converged). ``iters=None``: until the
    assignment repeats (at most ``max_iters``)."""
    n = feat.shape[0]
    size = n // k
    cent = _init_centroids(feat, energy, k)  # [k, T]
    limit = max_iters if iters is None else iters
    labels, converged, it = None, False, 0
    while it < limit and not converged:
        it += 1
        cost = (cent * cent).sum(1)[None, :] - 2.0 * feat @ cent.T  # [n, k] (|f_i|^2 = 1 dropped)
        new = torch.from_numpy(balanced_assignment(cost.double().cpu().numpy(), size)).to(feat.device)
        converged = labels is not None and torch.equal(new, labels)
        labels = new
        cent = torch.zeros_like(cent).index_add_(0, labels, feat) / size
    cohesion = (feat * F.normalize(cent, dim=-1)[labels]).sum(1).mean().item()
    return labels, cohesion, it, converged


@torch.no_grad()
def feature_partition(
    contrib: torch.Tensor,
    n_shared: int,
    k: int,
    iters: int | None = None,
    max_tokens: int = 8192,
) -> FeaturePartition:
    """``contrib [T, f]`` (see :func:`contributions`) -> shared neurons + k balanced routed experts.

    Clustering features use at most ``max_tokens`` evenly strided tokens."""
    T, f = contrib.shape
    energy = contrib.pow(2).mean(0)  # [f]
    shared, cand = split_shared(energy, n_shared)
    if k == 0:
        return FeaturePartition(shared, torch.empty(0, 0, dtype=torch.long, device=contrib.device), 1.0, 0, True)
    step = max(1, T // max_tokens)
    feat = F.normalize(contrib[::step, cand].T.contiguous(), dim=-1)  # [n, T']
    labels, cohesion, it, conv = balanced_feature_kmeans(feat, energy[cand], k, iters)
    order = torch.argsort(labels * len(cand) + torch.arange(len(cand), device=labels.device), stable=True)
    members = cand[order].view(k, -1)
    return FeaturePartition(shared, members, cohesion, it, conv)
