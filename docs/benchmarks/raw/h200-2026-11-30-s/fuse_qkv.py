"""Session 14 prototype (not in src/): q, k and v projections of every attention as one GEMM, for an A/B of the
part of the decode step that the dense and the MoE model share. ``fuse_qkv_(model)`` swaps q_proj for a module
that computes [q; k; v] with one weight and leaves k and v on a holder that k_proj and v_proj return (transformers
calls q_proj, k_proj, v_proj in that order, on the same input)."""
import torch
import torch.nn.functional as F
from torch import nn


class _Holder:
    pass


class _FusedQ(nn.Module):
    def __init__(self, q, k, v, holder):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]).detach(), requires_grad=False)
        self.sizes = [q.weight.shape[0], k.weight.shape[0], v.weight.shape[0]]
        self.holder = holder

    def forward(self, x):
        q, k, v = F.linear(x, self.weight).split(self.sizes, dim=-1)
        self.holder.k, self.holder.v = k, v
        return q


class _Take(nn.Module):
    def __init__(self, holder, name):
        super().__init__()
        self.holder, self.name = holder, name

    def forward(self, x):
        return getattr(self.holder, self.name)


def fuse_qkv_(model) -> int:
    n = 0
    for mod in model.modules():
        if all(isinstance(getattr(mod, p, None), nn.Linear) and getattr(mod, p).bias is None for p in ("q_proj", "k_proj", "v_proj")):
            h = _Holder()
            q, k, v = mod.q_proj, mod.k_proj, mod.v_proj
            mod.q_proj, mod.k_proj, mod.v_proj = _FusedQ(q, k, v, h), _Take(h, "k"), _Take(h, "v")
            mod._unfused = (q, k, v)
            n += 1
    return n


def unfuse_qkv_(model) -> None:
    for mod in model.modules():
        if hasattr(mod, "_unfused"):
            mod.q_proj, mod.k_proj, mod.v_proj = mod._unfused
            del mod._unfused
