"""Routed-expert compute: one registry of implementations of the same function.

Every implementation computes, for tokens ``x [T, d]`` routed to experts ``idx [T, a]`` with
weights ``weight [T, a]``::

    out[t] = sum_k weight[t, k] * down[idx[t, k]] @ (act(g) * u),   [g; u] = gate_up[idx[t, k]] @ x[t]

with stacked expert weights ``gate_up [E, 2m, d]`` (gate rows first, then up rows) and
``down [E, d, m]``. ``loop`` is the plain, readable oracle that every fast path is tested
against; the others must match it.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import activations

ExpertFn = Callable[..., torch.Tensor]
EXPERT_IMPLS: dict[str, ExpertFn] = {}


def register(name: str):
    def deco(fn: ExpertFn) -> ExpertFn:
        EXPERT_IMPLS[name] = fn
        return fn

    return deco


def _glu(h: torch.Tensor, act: str) -> torch.Tensor:
    g, u = h.chunk(2, dim=-1)
    return activations.apply(act, g) * u


def shared_expert(x, gate_up, down, act: str) -> torch.Tensor:
    """The shared expert from its raw weights: gate_up [2ms, d] (gate rows first), down [d, ms]."""
    return _glu(x @ gate_up.T, act) @ down.T


@register("loop")
def loop_experts(x, idx, weight, gate_up, down, act: str) -> torch.Tensor:
    """Reference: a Python loop over experts (host syncs; the oracle, not the fast path)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = _glu(x[tok] @ gate_up[e].T, act) @ down[e].T  # [n, d]
        out.index_add_(0, tok, y * weight[tok, slot, None].to(y.dtype))
    return out


@register("gather")
def gather_experts(x, idx, weight, gate_up, down, act: str) -> torch.Tensor:
    """Few tokens (decode): read only the selected experts' weights, no sort, no sync."""
    w1 = gate_up[idx]  # [T, a, 2m, d]
    w2 = down[idx]  # [T, a, d, m]
    h = _glu(torch.einsum("td,tamd->tam", x, w1), act)  # [T, a, m]
    y = torch.einsum("tam,tadm->tad", h, w2)  # [T, a, d]
    return (y * weight[..., None].to(y.dtype)).sum(1)


@register("dense")
def dense_experts(x, idx, weight, gate_up, down, act: str) -> torch.Tensor:
    """Every expert on every token, the routing as a mask: one GEMM over all experts' gate/up
    rows, each token's activations of expert e scaled by its weight for e (0 if it did not choose
    e), one batched GEMM over the experts' down projections. More FLOPs than needed, the same bytes
    once the routing touches every expert, no sort; on an H200 the fastest path at 128-384 tokens
    for layers with half or more of their neurons active (``cmoe.triton_experts.use_dense``; the
    whole-layer op ``cmoe.triton_experts.dense_moe`` runs the same GEMMs)."""
    T = x.shape[0]
    E, m = gate_up.shape[0], down.shape[2]
    coef = torch.zeros(T, E, device=x.device, dtype=torch.float32).scatter_(1, idx, weight.float())  # [T, E]
    g, u = (x @ gate_up.reshape(E * 2 * m, -1).T).view(T, E, 2, m).unbind(2)  # [T, E, m] each
    h = (activations.apply(act, g) * u * coef[..., None]).to(x.dtype)
    return torch.bmm(h.transpose(0, 1), down.transpose(1, 2)).sum(0)  # [E, T, d] -> [T, d]


def _glu_mv_(out, x, gate_up, down, w: float, act: str) -> None:
    """out [d] += w * down @ (act(g) * u), [g; u] = gate_up @ x: one expert, one token, as two
    matrix-vector products on views of its weights (the fewest ops for a CPU decode step)."""
    g, u = torch.mv(gate_up, x).chunk(2)
    out.addmv_(down, activations.apply(act, g) * u, alpha=w)


@register("select")
def select_experts(x, idx, weight, gate_up, down, act: str, shared_gate_up=None, shared_down=None) -> torch.Tensor:
    """Few tokens on the CPU: matrix-vector products with the chosen experts' weights in place
    (views, no copies), the shared expert's (if given) in the same loop; reads the routing on
    the host, so not for CUDA graphs or torch.compile."""
    out = torch.zeros_like(x)
    for t, (experts, weights) in enumerate(zip(idx.tolist(), weight.tolist())):
        x_t, out_t = x[t], out[t]
        if shared_gate_up is not None:
            _glu_mv_(out_t, x_t, shared_gate_up, shared_down, 1.0, act)
        for e, w in zip(experts, weights):
            _glu_mv_(out_t, x_t, gate_up[e], down[e], w, act)
    return out


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64), without the host sync of ``torch.bincount`` on CUDA."""
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).index_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Stable order of the pairs ``flat [P]`` (expert ids) by expert, on the device. The keys are
    sorted as 16-bit integers: a radix sort then takes 2 passes instead of 8."""
    keys = flat.to(torch.int16 if num_experts <= 2**15 else torch.int32)
    return keys.argsort(stable=True)


def expert_order(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [P], ends [E] int32): the P = T*a pairs of ``idx [T, a]`` in a stable order by
    expert, and the end row of each expert's group, with torch ops on the device."""
    return sort_by_expert(idx.reshape(-1), num_experts), expert_counts(idx, num_experts).cumsum(0).to(torch.int32)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM: rows ``offs[e-1]:offs[e]`` of ``a [R, k]`` times ``b[e] [k, n]``."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped_pairs(x, tokens, ends, gate_up, down, glu_fn) -> torch.Tensor:
    """[P, d]: the expert output, unweighted, of each of P (token, slot) pairs sorted by expert
    (row i is a pair of token ``tokens[i]``; expert e's rows end at ``ends[e]``), through two
    grouped GEMMs; ``glu_fn`` turns the gate/up rows [P, 2m] into [P, m]. No host sync."""
    gu = grouped_mm(x.index_select(0, tokens), gate_up.transpose(1, 2), ends)  # [P, 2m]
    return grouped_mm(glu_fn(gu), down.transpose(1, 2), ends)


@register("grouped")
def grouped_experts(x, idx, weight, gate_up, down, act: str) -> torch.Tensor:
    """Many tokens: sort (token, slot) pairs by expert on the device, two grouped GEMMs."""
    a = idx.shape[1]
    order, ends = expert_order(idx, gate_up.shape[0])
    tokens = order // a
    y = grouped_pairs(x, tokens, ends, gate_up, down, lambda gu: _glu(gu, act))
    y = y * weight.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def _load_triton() -> None:
    """Register the Triton kernels ("triton") if Triton is importable; once."""
    global _TRITON_TRIED
    if not _TRITON_TRIED:
        _TRITON_TRIED = True
        try:
            from . import triton_experts  # noqa: F401  (registers "triton")
        except ImportError:
            pass


_TRITON_TRIED = False


def fused_router():
    """The fused Triton router (``fn(router, x)``) when Triton is available, else None."""
    _load_triton()
    if "triton" not in EXPERT_IMPLS:
        return None
    from .triton_experts import fused_route

    return fused_route


def fused_layer():
    """The paths that run the whole layer, router included (``fn(layer, x)``, None for shapes
    they do not serve) when Triton is available, else None."""
    _load_triton()
    if "triton" not in EXPERT_IMPLS:
        return None
    from .triton_experts import layer_forward

    return layer_forward


def default_impl(x: torch.Tensor) -> str:
    """The implementation ``auto`` resolves to for this input."""
    if x.is_cuda:
        _load_triton()
        if "triton" in EXPERT_IMPLS:
            return "triton"
    return _torch_impl(x)


def _torch_impl(x: torch.Tensor, grad: bool = False) -> str:
    """Torch implementations; ``grad``: one that passes gradients to the routing weights. Traced
    by torch.compile, other dtypes than bf16 take ``dense`` beyond a few tokens: torch's grouped
    GEMM is traced for bf16 only, and the loop reads the routing on the host."""
    T, compiling = x.shape[0], torch.compiler.is_compiling()
    if x.is_cuda:
        return "grouped" if x.dtype == torch.bfloat16 else "gather" if T <= 8 else "dense" if compiling else "loop"
    if T <= 4 and not grad and not compiling:
        return "select"  # decode on the CPU
    return "gather" if T <= 2 else "dense" if compiling and x.dtype != torch.bfloat16 else "grouped"


def resolve_impl(impl: str, x, *tensors) -> str:
    """The implementation that ``impl`` ("auto" or a name) runs for input x; ``tensors``: the
    weights and routing weights, which decide whether a path with a backward is needed."""
    name = default_impl(x) if impl == "auto" else impl
    if name == "triton":
        _load_triton()
    if impl == "auto" and name in ("triton", "select"):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
            name = _torch_impl(x, grad=True)  # neither has a backward to the routing weights
    if name not in EXPERT_IMPLS:
        raise ValueError(
            f"unknown expert implementation {impl!r}; available: auto, {', '.join(sorted(EXPERT_IMPLS))}"
        )
    return name


FUSES_SHARED = {"select", "triton"}  # implementations that take the shared expert's weights too


def run_experts(impl: str, x, idx, weight, gate_up, down, act: str, shared=None) -> torch.Tensor:
    """``shared``: (shared_gate_up [2ms, d], shared_down [d, ms]): also add the shared expert
    (the ``FUSES_SHARED`` implementations compute it in the same kernels or loop, the others
    with two matmuls)."""
    name = resolve_impl(impl, x, weight, gate_up, down)
    if shared is None:
        return EXPERT_IMPLS[name](x, idx, weight, gate_up, down, act)
    if name in FUSES_SHARED:
        return EXPERT_IMPLS[name](x, idx, weight, gate_up, down, act, *shared)
    return EXPERT_IMPLS[name](x, idx, weight, gate_up, down, act) + shared_expert(x, *shared, act)
