"""Carve one dense FFN into a CMoE layer (method.md sections 3-5).

shared expert = the s*m neurons with the highest activation rates; routed experts = balanced
k-means of the remaining neurons' marker columns; analytical router = the normalised gate/up
rows of each cluster's representative neuron.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .analysis import Markers, atopk_markers
from .clustering import balanced_kmeans, shared_and_candidates
from .config import CMoEConfig
from .families import FFNWeights
from .moe import CMoEMLP, MoELayerSpec


@dataclass
class CarveStats:
    """What carving one layer found (reported per layer)."""

    shared_rate: float  # mean activation rate of the shared neurons
    routed_rate: float  # mean activation rate of the routed neurons
    assignment_cost: float
    cohesion: float
    kmeans_iters: int


@dataclass
class Partition:
    shared: torch.Tensor  # [ms] neuron ids
    members: torch.Tensor  # [k, m] neuron ids of each routed expert
    representatives: torch.Tensor  # [k] neuron id of each routed expert's representative


def partition(markers: Markers, f: int, cfg: CMoEConfig) -> tuple[Partition, CarveStats]:
    m = f // cfg.experts
    k = cfg.experts - cfg.shared
    shared, candidates = shared_and_candidates(markers.rates, cfg.shared * m)
    if k == 0:
        empty = torch.empty(0, m, dtype=torch.long)
        part = Partition(shared, empty, torch.empty(0, dtype=torch.long))
        return part, CarveStats(markers.rates[shared].mean().item(), 0.0, 0.0, 0.0, 0)
    res = balanced_kmeans(markers.topk_idx, f, candidates, markers.rates, k, iters=cfg.kmeans_iters)
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
    reps = part.representatives.to(w.gate.device)
    if spec.num_experts and cfg.router == "analytical":
        moe.router.gate.copy_(F.normalize(w.gate[reps].float(), dim=-1))
        moe.router.up.copy_(F.normalize(w.up[reps].float(), dim=-1))
    moe.neuron_index.copy_(torch.cat([sh, mem.reshape(-1)]).to(torch.int32))
    return moe


def carve(w: FFNWeights, x: torch.Tensor, cfg: CMoEConfig) -> tuple[CMoEMLP, CarveStats]:
    """Dense FFN weights + its calibration inputs x [T, d] -> CMoE layer."""
    cfg.check_layer(w.intermediate_size)
    markers = atopk_markers(x, w, cfg.k_act)
    part, stats = partition(markers, w.intermediate_size, cfg)
    return build_moe(w, part, cfg, dtype=w.gate.dtype), stats
