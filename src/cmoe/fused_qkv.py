"""The q, k and v projections of each attention as one GEMM, for generation (dense and MoE alike).

transformers' attentions call ``q_proj``, ``k_proj`` and ``v_proj`` one after the other on the
same hidden states: three GEMMs (three GEMVs at decode batch 1) that read the input three times
and pay three launches and three tails. Inside ``fused_qkv(model)`` each attention whose three
projections are plain ``nn.Linear`` of one input size, dtype and device (with biases on all three
or on none) computes ``[q; k; v]`` with one weight and hands k and v to ``k_proj`` and ``v_proj``.
On an H200 this made the dense LLaMA-2-7B-shaped decode step at batch 1 5.5 % faster (0.698 ->
0.660 ms, 4 layers; run t in docs/benchmarks/speed-h200-log.md).

No weight is copied: the first entry moves q, k and v into one ``[nq + nk + nv, d]`` storage, one
attention at a time, and leaves the three parameters as views of it (the same ``Parameter``
objects, names and shapes; ``state_dict``, ``load_state_dict`` and saving see nothing new, and
transformers' saving clones views that share a storage). On exit the modules are put back; the
storage stays fused, so the next entry reuses it (and the wrappers, so compiled code and captured
CUDA graphs stay valid) unless the parameters were moved or replaced since.

    from cmoe.fused_qkv import fused_qkv
    with fused_qkv(model):
        logits = model(ids).logits
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

PROJ = ("q_proj", "k_proj", "v_proj")
_STASH = "_cmoe_fused_qkv"  # on each fusable attention: its _Fused, built once


class _Handoff:
    """k and v of the last ``[q; k; v]`` GEMM, and its input, until ``v_proj`` takes them."""

    __slots__ = ("x", "k", "v")

    def __init__(self):
        self.x = self.k = self.v = None


class _QKV(nn.Module):
    """Stands in for ``q_proj``: one GEMM of ``x [..., d]`` with the fused weight; returns q, keeps k and v."""

    def __init__(self, q: nn.Linear, fused_w: torch.Tensor, fused_b: torch.Tensor | None, sizes: list[int], handoff):
        super().__init__()
        self.weight, self.bias = q.weight, q.bias  # the same parameters (views of fused_w, fused_b)
        self.__dict__.update(fused_w=fused_w, fused_b=fused_b, sizes=sizes, handoff=handoff)  # not in state_dict
        self.__dict__["linear"] = F.linear  # cmoe.gemv.gemv_projections swaps in its one-row GEMV

    def forward(self, x):
        q, k, v = self.linear(x, self.fused_w, self.fused_b).split(self.sizes, dim=-1)
        self.handoff.x, self.handoff.k, self.handoff.v = x, k, v
        return q


class _Take(nn.Module):
    """Stands in for ``k_proj`` (part "k") or ``v_proj`` (part "v"): returns what the ``[q; k; v]``
    GEMM computed from the same input."""

    def __init__(self, proj: nn.Linear, part: str, handoff):
        super().__init__()
        self.weight, self.bias = proj.weight, proj.bias
        self.__dict__.update(part=part, handoff=handoff)

    def forward(self, x):
        h = self.handoff
        if x is not h.x:
            raise RuntimeError(
                f"fused_qkv: {self.part}_proj was called on another input than q_proj just before; this attention does "
                "not call q_proj, k_proj, v_proj in that order on the same hidden states, so it cannot be fused"
            )
        out = getattr(h, self.part)
        if self.part == "v":  # the last one: drop the references
            h.x = h.k = h.v = None
        return out


class _Fused:
    """One attention's fused storage and stand-ins, and its original projections."""

    def __init__(self, attn: nn.Module):
        projs = [getattr(attn, p) for p in PROJ]
        self.originals = projs
        with torch.no_grad():
            weight = _fuse_storage([p.weight for p in projs])
            bias = None if projs[0].bias is None else _fuse_storage([p.bias for p in projs])
        sizes = [p.weight.shape[0] for p in projs]
        h = _Handoff()
        self.modules = [_QKV(projs[0], weight, bias, sizes, h), _Take(projs[1], "k", h), _Take(projs[2], "v", h)]
        self.ptrs = self._param_ptrs()

    def _param_ptrs(self) -> tuple:
        return tuple((t.data_ptr(), t.dtype, t.device) for p in self.originals for t in (p.weight, p.bias) if t is not None)

    def valid_for(self, attn: nn.Module) -> bool:
        """Whether the attention still holds the same projections, still views of this storage."""
        return all(getattr(attn, n) is o or getattr(attn, n) is m for n, o, m in zip(PROJ, self.originals, self.modules)) and (
            self._param_ptrs() == self.ptrs
        )


def _fuse_storage(params: list[nn.Parameter]) -> torch.Tensor:
    """Moves ``params`` (same trailing shape) into one new tensor, concatenated along dim 0, and
    makes each a view of its rows; returns the new tensor. The old storages are freed when nothing
    else holds them, so the peak extra memory is one attention's projections."""
    with torch.inference_mode(False):  # a normal tensor even under inference_mode (training may follow)
        fused = torch.cat([p.data for p in params])
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


def fusable(attn: nn.Module) -> bool:
    """Whether ``attn`` has q/k/v projections that ``fused_qkv`` can merge."""
    projs = [getattr(attn, p, None) for p in PROJ]
    if not all(type(p) is nn.Linear for p in projs):  # adapters (peft), quantised layers, other stand-ins: left alone
        return False
    w = [p.weight for p in projs]
    has_bias = [p.bias is not None for p in projs]
    return (
        not any(hasattr(p, "_hf_hook") or p.weight.device.type == "meta" for p in projs)  # offloaded (accelerate)
        and len({(t.shape[1], t.dtype, t.device) for t in w}) == 1
        and len(set(has_bias)) == 1
        and len({id(t) for t in w}) == 3
    )


def _needs_grad(attn: nn.Module) -> bool:
    """The stand-ins compute with the fused tensor, which autograd does not connect to the parameters."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in attn.parameters(recurse=True))


def fuse_qkv_(model: nn.Module) -> list[nn.Module]:
    """Swap the stand-ins into every fusable attention of ``model``; returns the attentions swapped."""
    done = []
    for attn in model.modules():
        if not hasattr(attn, "q_proj") or _needs_grad(attn):
            continue
        stash = attn.__dict__.get(_STASH)
        if stash is not None and stash.valid_for(attn):
            if attn.q_proj is stash.modules[0]:
                continue  # already fused (an outer fused_qkv)
        elif fusable(attn):
            stash = attn.__dict__[_STASH] = _Fused(attn)
        else:
            continue
        for name, m in zip(PROJ, stash.modules):
            setattr(attn, name, m)
        done.append(attn)
    return done


def unfuse_qkv_(attns: list[nn.Module]) -> None:
    """Put the original projections back into ``attns`` (their weights stay views of one storage)."""
    for attn in attns:
        for name, m in zip(PROJ, attn.__dict__[_STASH].originals):
            setattr(attn, name, m)


@contextmanager
def fused_qkv(model: nn.Module):
    """Inside, every fusable attention of ``model`` computes q, k and v with one GEMM."""
    attns = fuse_qkv_(model)
    try:
        yield attns
    finally:
        unfuse_qkv_(attns)
