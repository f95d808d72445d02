"""Carve one dense FFN into a CMoE layer (method.md sections 3-5, and issue 5's recipes).

features "markers" (the paper): shared expert = the s*m neurons with the highest activation
rates; routed experts = balanced k-means of the remaining neurons' marker columns.
features "contrib": see ``cmoe.partition`` (output-contribution energy and co-activation).
router "analytical" (the paper): the normalised gate/up rows of each cluster's representative
neuron; "linear": ridge regression from the FFN input to each routed expert's output norm
(``cmoe.routing``). Every layer reports its router's top-a agreement with the oracle (the a
experts of largest output norm) on the calibration tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import partition as contrib_partition
from .analysis import Markers, atopk_markers, check_activations
from .clustering import balanced_kmeans, shared_and_candidates
from .config import CMoEConfig
from .families import FFNWeights
from .moe import CMoEMLP, MoELayerSpec
from .refit import refit_down
from .routing import expert_output_norms, fit_linear_router, topk_agreement


@dataclass
class CarveStats:
    """What carving one layer found (reported per layer)."""

    shared_rate: float  # mean activation rate of the shared neurons
    routed_rate: float  # mean activation rate of the routed neurons
    assignment_cost: float
    cohesion: float  # markers: mean L1 to the centroid / T (lower is better); contrib: mean cosine (higher)
    kmeans_iters: int
    router_agreement: float = math.nan  # mean |top-a(router) & top-a(oracle)| / a on calibration tokens
    error_before_refit: float = math.nan  # |y_dense - y_moe|^2 / |y_dense|^2 on the fit tokens
    error: float = math.nan  # the same after the refit (NaN without a refit)
    shared_size: int = 0
    num_experts: int = 0
    top_k: int = 0


@dataclass
class Partition:
    shared: torch.Tensor  # [ms] neuron ids
    members: torch.Tensor  # [k, m] neuron ids of each routed expert
    representatives: torch.Tensor | None  # [k] neuron id of each routed expert's representative


def partition(markers: Markers, f: int, cfg: CMoEConfig) -> tuple[Partition, CarveStats]:
    m = f // cfg.experts
    k = cfg.experts - cfg.shared
    shared, candidates = shared_and_candidates(markers.rates, cfg.shared * m)
    if k == 0:
        empty = torch.empty(0, m, dtype=torch.long)
        part = Partition(shared, empty, torch.empty(0, dtype=torch.long))
        return part, CarveStats(markers.rates[shared].mean().item(), 0.0, 0.0, 0.0, 0)
    res = balanced_kmeans(markers.topk_idx, f, candidates, markers.rates, k, iters=cfg.kmeans_iters or None)
    part = Partition(shared, res.members, res.representatives)
    stats = CarveStats(
        shared_rate=markers.rates[shared].mean().item() if shared.numel() else 0.0,
        routed_rate=markers.rates[candidates].mean().item(),
        assignment_cost=float(res.cost),
        cohesion=float(res.cohesion),
        kmeans_iters=int(res.iterations),
    )
    return part, stats


@torch.no_grad()
def build_moe(w: FFNWeights, part: Partition, cfg: CMoEConfig, dtype: torch.dtype) -> CMoEMLP:
    """Copy the dense FFN's rows/columns into a CMoEMLP laid out by ``part``."""
    f, d = w.gate.shape
    m = f // cfg.experts
    spec = MoELayerSpec(
        hidden_size=d,
        shared_size=part.shared.numel(),
        num_experts=part.members.shape[0],
        expert_size=m,
        top_k=cfg.active,
        act=w.act,
        router=cfg.router,
    )
    moe = CMoEMLP(spec).to(device=w.gate.device, dtype=dtype)
    sh = part.shared.to(w.gate.device)
    moe.shared_gate_up.weight.copy_(torch.cat([w.gate[sh], w.up[sh]]))
    moe.shared_down.weight.copy_(w.down[:, sh])
    mem = part.members.to(w.gate.device)  # [k, m]
    moe.experts.gate_up_proj.copy_(torch.cat([w.gate[mem], w.up[mem]], dim=1))  # [k, 2m, d]
    moe.experts.down_proj.copy_(w.down[:, mem].permute(1, 0, 2))  # [k, d, m]
    reps = None if part.representatives is None else part.representatives.to(w.gate.device)
    if spec.num_experts and cfg.router == "analytical":
        if reps is None:
            raise ValueError("the analytical router needs representative neurons (features='markers')")
        moe.router.gate.copy_(F.normalize(w.gate[reps].float(), dim=-1))
        moe.router.up.copy_(F.normalize(w.up[reps].float(), dim=-1))
    moe.neuron_index.copy_(torch.cat([sh, mem.reshape(-1)]).to(torch.int32))
    return moe


def partition_contrib(w: FFNWeights, x: torch.Tensor, cfg: CMoEConfig) -> tuple[Partition, CarveStats]:
    f = w.intermediate_size
    m = f // cfg.experts
    k = cfg.experts - cfg.shared
    step = max(1, x.shape[0] // cfg.cluster_tokens)
    contrib = contrib_partition.contributions(x[::step], w)  # [T', f], evenly strided tokens
    fp = contrib_partition.feature_partition(
        contrib, cfg.shared * m, k, iters=cfg.kmeans_iters or None, max_tokens=cfg.cluster_tokens
    )
    del contrib
    members = fp.members if k else torch.empty(0, m, dtype=torch.long)
    reps = None
    if cfg.router == "analytical" and k:  # representative: the member of highest mean activation rate
        rates = atopk_markers(x, w, cfg.k_act).rates
        reps = members.gather(1, rates[members].argmax(1, keepdim=True)).squeeze(1)
    part = Partition(fp.shared, members, reps)
    stats = CarveStats(math.nan, math.nan, math.nan, fp.cohesion, fp.iterations)
    return part, stats


def fit_sample(x: torch.Tensor, cfg: CMoEConfig) -> torch.Tensor:
    """About ``cfg.fit_tokens`` evenly strided calibration tokens: what the router fit and the
    down refit use (each costs one FFN pass over them)."""
    return x[:: max(1, x.shape[0] // cfg.fit_tokens)]


@torch.no_grad()
def fit_router(moe: CMoEMLP, x: torch.Tensor, cfg: CMoEConfig) -> float:
    """Fit the linear router (if any) on the calibration inputs x [T, d]; return the router's
    top-a agreement with the oracle on those tokens."""
    spec = moe.spec
    if spec.num_experts == 0 or spec.top_k == 0:
        return 1.0
    x = fit_sample(x, cfg)
    norms = expert_output_norms(x, moe.experts.gate_up_proj, moe.experts.down_proj, spec.act)  # [T, E]
    if cfg.router == "linear":
        moe.router.weight.copy_(fit_linear_router(x, norms, cfg.ridge))
    scores = torch.cat([moe.router.scores(xc) for xc in x.split(4096)])  # [T, E]
    return topk_agreement(scores, norms, spec.top_k)


def carve(w: FFNWeights, x: torch.Tensor, cfg: CMoEConfig, toward: torch.Tensor | None = None) -> tuple[CMoEMLP, CarveStats]:
    """Dense FFN weights + its calibration inputs x [T, d] -> CMoE layer.

    ``cfg``'s S/A/E are this layer's (``cmoe.allocation`` gives each layer its own).
    ``toward`` [T, d]: the outputs that would restore the dense model's stream (see
    ``cmoe.refit.refit_down``), used by the down refit with weight ``cfg.refit_stream``."""
    cfg.check_layer(w.intermediate_size)
    check_activations(x)
    if cfg.features == "markers":
        part, stats = partition(atopk_markers(x, w, cfg.k_act), w.intermediate_size, cfg)
    else:
        part, stats = partition_contrib(w, x, cfg)
    moe = build_moe(w, part, cfg, dtype=w.gate.dtype)
    stats.router_agreement = fit_router(moe, x, cfg)
    if cfg.refit == "down":
        stats.error_before_refit, stats.error = refit_down(
            moe, fit_sample(x, cfg), cfg.refit_ridge, None if toward is None else fit_sample(toward, cfg), cfg.refit_stream
        )
    stats.shared_size, stats.num_experts, stats.top_k = moe.spec.shared_size, moe.spec.num_experts, moe.spec.top_k
    return moe, stats
