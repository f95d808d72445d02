"""Per-layer allocation of activated FFN neurons under a model-wide budget (issue 5).

With ``CMoEConfig(budget=0.5, experts=8)`` every layer l gets k_l "units" of m = f/e neurons
active per token (``k_l = e``: the layer stays dense), with ``sum_l k_l = budget * L * e``
exactly, so the model-wide activated fraction of FFN parameters is the budget exactly.

Sensitivity (measured on the dense model, a few calibration sequences): for every layer and
every k, the output error of keeping the ``ceil(k/2) m`` shared neurons of highest energy plus,
per token, the ``floor(k/2) m`` other neurons of largest output contribution (the
fine-grained oracle of the layer's MoE), relative to the typical energy of the residual stream
after that layer (d x the median over dimensions of E_t[resid_tj^2], robust to the few
"massive activation" dimensions)::

    cost_l(k) = E_t |y_t - y_hat_t(k)|^2 / (d median_j E_t[resid_tj^2])

The k_l minimising ``sum_l cost_l(k_l)`` under the budget and the per-layer limits
(``min_active <= k_l / e <= max_active``) are found exactly by dynamic programming. A layer
with k units is carved as S{ceil(k/2)}A{floor(k/2)}E{e} (dense when k = e).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import CMoEConfig, ConfigError
from .families import FFNWeights
from .partition import neuron_activations


@dataclass(frozen=True)
class LayerAllocation:
    shared: int  # S: shared units
    active: int  # A: routed units chosen per token
    experts: int  # E

    @property
    def units(self) -> int:
        return self.shared + self.active


def split_units(k: int, e: int) -> LayerAllocation:
    """k active units of e -> S{ceil(k/2)}A{floor(k/2)}E{e}; k = e: dense (S = e, A = 0)."""
    if k >= e:
        return LayerAllocation(e, 0, e)
    return LayerAllocation(k - k // 2, k // 2, e)


def budget_units(budget: float, layers: int, e: int) -> int:
    """Total units ``budget * layers * e``; it must be an integer for the budget to be met exactly."""
    total = budget * layers * e
    k = round(total)
    if not math.isclose(total, k, abs_tol=1e-6):
        lo, hi = math.floor(total) / (layers * e), math.ceil(total) / (layers * e)
        raise ConfigError(
            f"budget {budget} x {layers} layers x {e} experts = {total:.3f} units is not an integer, so it "
            f"cannot be met exactly; use {lo:.6g} or {hi:.6g}, or another number of experts"
        )
    return k


@torch.no_grad()
def sensitivity(x: torch.Tensor, w: FFNWeights, resid_energy: float, e: int) -> torch.Tensor:
    """cost [e + 1] of one layer for k = 0..e active units (see the module docstring)."""
    h = neuron_activations(x, w)  # [T, f]
    down = w.down.float()  # [d, f]
    c = h.abs() * down.norm(dim=0)  # [T, f]
    y = h @ down.T  # [T, d]
    f = h.shape[1]
    m = f // e
    order = torch.argsort(c.pow(2).mean(0), descending=True, stable=True)  # neurons by energy
    cost = torch.zeros(e + 1, device=h.device)
    for k in range(e + 1):
        alloc = split_units(k, e)
        keep = torch.zeros_like(h, dtype=torch.bool)
        keep[:, order[: alloc.shared * m]] = True
        if alloc.active:
            rest = order[alloc.shared * m :]
            top = c[:, rest].topk(alloc.active * m, dim=1).indices  # [T, A m]
            keep.scatter_(1, rest[top], True)
        err = y - (h * keep) @ down.T
        cost[k] = err.pow(2).sum(1).mean() / resid_energy
    return cost


def allocate(costs: torch.Tensor, cfg: CMoEConfig) -> list[LayerAllocation]:
    """``costs [L, e + 1]`` -> the per-layer allocation minimising the total cost with
    ``sum k_l = budget * L * e`` exactly and ``min_active <= k_l / e <= max_active``."""
    L, e = costs.shape[0], cfg.experts
    total = budget_units(cfg.active_fraction, L, e)
    lo = max(1, math.ceil(cfg.min_active * e - 1e-9))
    hi = min(e, math.floor(cfg.max_active * e + 1e-9))
    if not L * lo <= total <= L * hi:
        raise ConfigError(
            f"budget {cfg.active_fraction:g} is outside what the per-layer limits allow: "
            f"[{L * lo / (L * e):.4g}, {L * hi / (L * e):.4g}] (min_active={cfg.min_active}, max_active={cfg.max_active})"
        )
    c = costs.double().tolist()
    inf = float("inf")
    best = [0.0] + [inf] * total  # best[u]: min cost of the layers so far using u units
    choice = []
    for l in range(L):
        new, arg = [inf] * (total + 1), [-1] * (total + 1)
        for u in range(total + 1):
            for k in range(lo, min(hi, u) + 1):
                v = best[u - k] + c[l][k]
                if v < new[u]:
                    new[u], arg[u] = v, k
        best = new
        choice.append(arg)
    ks, u = [], total
    for l in reversed(range(L)):
        k = choice[l][u]
        ks.append(k)
        u -= k
    ks.reverse()
    return [split_units(k, e) for k in ks]


def allocation_table(specs: list[dict]) -> list[dict]:
    """Per layer (from the saved MoE layer specs): shared, routed experts, top-k, activated fraction."""
    rows = []
    for i, s in enumerate(specs):
        f = s["shared_size"] + s["num_experts"] * s["expert_size"]
        active = s["shared_size"] + s["top_k"] * s["expert_size"]
        rows.append(dict(layer=i, shared=s["shared_size"], experts=s["num_experts"], top_k=s["top_k"],
                         expert_size=s["expert_size"], active=active, total=f, fraction=active / f))
    return rows


def plot_allocation(specs: list[dict], path: str, title: str = "") -> str:
    """Bar chart of each layer's activated FFN neurons (shared + routed) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = allocation_table(specs)
    layers = [r["layer"] for r in rows]
    shared = [r["shared"] / r["total"] for r in rows]
    routed = [(r["active"] - r["shared"]) / r["total"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 3.5))
    ax.bar(layers, shared, label="shared expert")
    ax.bar(layers, routed, bottom=shared, label="routed (top-k x expert size)")
    total = sum(r["active"] for r in rows) / sum(r["total"] for r in rows)
    ax.axhline(total, color="k", lw=0.8, ls="--", label=f"model-wide {total:.1%}")
    ax.set_xlabel("layer")
    ax.set_ylabel("activated fraction of FFN neurons")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "CMoE per-layer allocation")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
