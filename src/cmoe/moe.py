"""The module that replaces a dense gated FFN: shared expert + routed experts + router.

Layout (the transformers/scattermoe convention):

- ``shared_gate_up``: Linear d -> 2*ms (gate rows first), ``shared_down``: Linear ms -> d
- ``experts.gate_up_proj [E, 2m, d]``, ``experts.down_proj [E, d, m]``
- ``router``: an analytical (method.md section 5) or linear router producing top-a experts
  and their weights ``1 + p_j * v_j`` (exactly 1 while the scale v is 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import activations
from . import experts
from .experts import expert_counts, run_experts


@dataclass(frozen=True)
class MoELayerSpec:
    """Shape of one converted FFN layer (saved per layer in config.json)."""

    hidden_size: int
    shared_size: int  # neurons in the always-on shared expert
    num_experts: int  # routed experts
    expert_size: int  # neurons per routed expert (m)
    top_k: int  # routed experts chosen per token (a)
    act: str  # canonical activation name
    router: str = "analytical"

    def __post_init__(self):
        if not 0 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [0, num_experts={self.num_experts}]")
        activations.canonical(self.act)
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; available: {sorted(ROUTERS)}")

    @property
    def intermediate_size(self) -> int:
        return self.shared_size + self.num_experts * self.expert_size

    @property
    def active_size(self) -> int:
        return self.shared_size + self.top_k * self.expert_size

    def to_dict(self) -> dict:
        return asdict(self)


class Router(nn.Module):
    """Top-a of ``p + b`` with ``p = softmax(scores(x))``; chosen weights ``1 + p_j * v_j``."""

    def __init__(self, spec: MoELayerSpec):
        super().__init__()
        self.act = spec.act
        self.top_k = spec.top_k
        self.scale = nn.Parameter(torch.zeros(spec.num_experts))  # v, trained during fine-tuning
        self.register_buffer("bias", torch.zeros(spec.num_experts))  # b, load balancing, no gradient

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E] float32
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.is_cuda and not torch.is_grad_enabled():
            fused = experts.fused_router()  # the whole router in one Triton kernel (two for few tokens)
            if fused is not None:
                return fused(self, x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = F.softmax(self.scores(x), dim=-1)  # [T, E]
        idx = torch.topk(p + self.bias.float(), self.top_k, dim=-1).indices  # [T, a]
        weight = 1.0 + p.gather(1, idx) * self.scale.float()[idx]  # [T, a]
        return idx, weight, p


class AnalyticalRouter(Router):
    """score_j(x) = |<u_j, x> * act(<g_j, x>)|, (g_j, u_j) = normalised rows of the
    representative neuron of expert j (method.md section 5)."""

    def __init__(self, spec: MoELayerSpec):
        super().__init__(spec)
        self.gate = nn.Parameter(torch.zeros(spec.num_experts, spec.hidden_size))  # [E, d]
        self.up = nn.Parameter(torch.zeros(spec.num_experts, spec.hidden_size))  # [E, d]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        g = x @ self.gate.float().T
        u = x @ self.up.float().T
        return (u * activations.apply(self.act, g)).abs()


class LinearRouter(Router):
    """scores = W x: a plain linear router (fitted in closed form by some recipes)."""

    def __init__(self, spec: MoELayerSpec):
        super().__init__(spec)
        self.weight = nn.Parameter(torch.zeros(spec.num_experts, spec.hidden_size))  # [E, d]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.float().T


ROUTERS = {"analytical": AnalyticalRouter, "linear": LinearRouter}


class RoutedExperts(nn.Module):
    def __init__(self, spec: MoELayerSpec):
        super().__init__()
        E, m, d = spec.num_experts, spec.expert_size, spec.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * m, d))  # [E, 2m, d]
        self.down_proj = nn.Parameter(torch.zeros(E, d, m))  # [E, d, m]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, act: str, impl: str,
                shared=None) -> torch.Tensor:
        """x [T, d], idx/weight [T, a] -> [T, d] (a module call, so that peft's parametrized
        LoRA on the stacked weights applies); ``shared``: the shared expert's two weights, to
        compute it in the same kernels (``cmoe.experts.run_experts``)."""
        return run_experts(impl, x, idx, weight, self.gate_up_proj, self.down_proj, act, shared)


class CMoEMLP(nn.Module):
    """Drop-in replacement of a gated FFN: ``y = Shared(x) + sum_chosen w_j Expert_j(x)``.

    ``impl`` picks the routed-expert implementation from ``cmoe.experts.EXPERT_IMPLS``
    ("auto", "loop", "grouped", "gather", and "triton" when available). Set
    ``collect_load = True`` to accumulate tokens per expert in ``expert_load``.
    """

    def __init__(self, spec: MoELayerSpec, impl: str = "auto"):
        super().__init__()
        self.spec = spec
        self.impl = impl
        self.collect_load = False
        d, ms = spec.hidden_size, spec.shared_size
        self.shared_gate_up = nn.Linear(d, 2 * ms, bias=False)
        self.shared_down = nn.Linear(ms, d, bias=False)
        self.experts = RoutedExperts(spec)
        self.router = ROUTERS[spec.router](spec)
        # original neuron index of each position: shared first, then expert 0, 1, ...
        self.register_buffer("neuron_index", torch.arange(spec.intermediate_size, dtype=torch.int32))
        self.register_buffer("expert_load", torch.zeros(spec.num_experts, dtype=torch.long), persistent=False)
        self.last_router_probs: torch.Tensor | None = None  # kept only while keep_router_probs
        self.keep_router_probs = False

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.shared_size == 0:
            return torch.zeros_like(x)
        g, u = self.shared_gate_up(x).chunk(2, dim=-1)
        return self.shared_down(activations.apply(self.spec.act, g) * u)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, d] -> (idx [T, a], weight [T, a] float32, probs [T, E] float32)."""
        return self.router(x)

    def _fusable_shared(self) -> bool:
        """The shared expert is two plain linear maps (no adapter wrapped around them)."""
        return type(self.shared_gate_up) is nn.Linear and type(self.shared_down) is nn.Linear and not (
            parametrize.is_parametrized(self.shared_gate_up) or parametrize.is_parametrized(self.shared_down)
        )

    def _fusable_layer(self) -> bool:
        """Nothing asks for the routing itself, and the shared expert's weights are plain."""
        return not (self.collect_load or self.keep_router_probs) and (self.spec.shared_size == 0 or self._fusable_shared())

    def forward(self, hidden: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # [T, d]
        if self.spec.top_k == 0:
            return self.shared(x).reshape(shape)
        impl = impl or self.impl
        if impl in ("auto", "triton") and x.is_cuda and not torch.is_grad_enabled() and self._fusable_layer():
            whole = experts.fused_layer()  # router and experts in one op, for the batches where that pays
            out = whole(self, x) if whole is not None else None
            if out is not None:
                return out.reshape(shape)
        idx, weight, probs = self.router.forward_reference(x) if impl == "loop" else self.route(x)
        if self.collect_load:
            self.expert_load += expert_counts(idx, self.spec.num_experts)
        if self.keep_router_probs:
            self.last_router_probs = probs
        if self.spec.shared_size and self._fusable_shared():  # run in the same kernels (triton) or loop (select)
            out = self.experts(x, idx, weight, self.spec.act, impl, (self.shared_gate_up.weight, self.shared_down.weight))
        else:
            out = self.experts(x, idx, weight, self.spec.act, impl)
            if self.spec.shared_size:
                out = out + self.shared(x)
        return out.reshape(shape)

    def forward_reference(self, hidden: torch.Tensor) -> torch.Tensor:
        """The plain oracle: the torch router, a loop over experts."""
        return self.forward(hidden, impl="loop")

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"shared={s.shared_size}, experts={s.num_experts}x{s.expert_size}, top_k={s.top_k}, "
            f"act={s.act}, router={s.router}, impl={self.impl}"
        )


def set_expert_impl(model: nn.Module, impl: str) -> None:
    """Choose the routed-expert implementation of every CMoE layer of ``model``."""
    for mod in model.modules():
        if isinstance(mod, CMoEMLP):
            mod.impl = impl


def moe_layers(model: nn.Module) -> list[CMoEMLP]:
    return [m for m in model.modules() if isinstance(m, CMoEMLP)]
