"""One token through a linear layer on a GPU, in one Triton launch: ``out = x @ W^T (+ b)``.

At decode batch 1 cuBLAS runs the attention's output projection (a square [d, d] weight) as a
split-K GEMV plus a separate reduction kernel, and q/k/v at 3.3-3.7 TB/s. ``gemv`` reads the
weight once, two rows per program, and writes the output directly. On an H200, with the weights
out of L2 (``benchmarks/bench_gemv.py``; docs/benchmarks/speed-h200-log.md, run aa), two machines:
11.0 / 9.9 against cuBLAS's 12.7 / 13.6 us for [4096 x 4096], 14.6 / 13.8 against 16.1 / 15.4 us for
[6144 x 4096], 26.9 / 24.6 against 30.3 / 27.5 us for [12288 x 4096].

``gemv_projections(model)`` sends the attention projections of a model to it while generating:
the fused q/k/v GEMM (``cmoe.fused_qkv``) and ``o_proj``, dense and converted models alike.

    from cmoe.gemv import linear
    y = linear(x, weight, bias)      # x [..., K]: gemv for one row on a GPU, F.linear otherwise
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from . import pdl
from .fused_qkv import _QKV
from .triton_experts import _INTERPRET

GEMV_TILE = (2, 2048, 2)  # (BN rows, BK columns, num_warps) per program; the fastest of 10 on 4 shapes (H200, run aa)
PROJECTIONS = ("o_proj",)  # plain nn.Linear children that gemv_projections swaps (q/k/v: through cmoe.fused_qkv)
_STASH = "_cmoe_gemv_"  # on each parent: its stand-ins, built once


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K,  # x [K], w [N, K], b [N], out [N]
                 HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    w = w_ptr + offs_n[:, None].to(tl.int64) * K  # [BN, 1]
    acc = tl.zeros((BN, BK), tl.float32)
    k_first = 0
    if PDL:  # the first block of weights read before waiting for x (cmoe.pdl)
        offs_k = tl.arange(0, BK)
        k_ok = offs_k < K
        wk = tl.load(w + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        pdl.wait(PDL)
        acc += wk.to(tl.float32) * tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        k_first = BK
    for k0 in range(k_first, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        xk = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        wk = tl.load(w + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc += wk.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: tuple[int, int, int]) -> torch.Tensor:
    """``_gemv_kernel`` with ``tile`` = (BN, BK, num_warps): [N] in x's dtype."""
    N, K = weight.shape
    bn, bk, nw = tile
    out = torch.empty(N, device=x.device, dtype=x.dtype)
    w = weight.contiguous()
    _gemv_kernel[(triton.cdiv(N, bn),)](x.contiguous(), w, w if bias is None else bias, out, N, K,
                                          HAS_BIAS=bias is not None, BN=bn, BK=min(bk, triton.next_power_of_2(K)),
                                          num_warps=nw, **pdl.launch(x))
    return out


@torch.library.custom_op("cmoe::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [K] (one row), weight [N, K], bias [N] or None -> [N] in x's dtype."""
    return launch(x, weight, bias, (16, 64, 4) if _INTERPRET else GEMV_TILE)


@gemv.register_fake
def _(x, weight, bias=None):
    return x.new_empty(weight.shape[0])


def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row, one dtype, nothing to differentiate."""
    return (
        x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through ``gemv`` for one row on a GPU."""
    if x.is_cuda and serves(x, weight) and (bias is None or bias.dtype == x.dtype):
        return gemv(x.reshape(-1), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class OneRowLinear(nn.Module):
    """Stands in for an ``nn.Linear`` (the same parameters): ``linear``."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def _stand_in(parent: nn.Module, name: str, lin: nn.Linear) -> OneRowLinear:
    """The stand-in of ``parent.name``, kept across entries (compiled code and captured CUDA
    graphs stay valid) while it holds the same parameters."""
    key = _STASH + name
    stand = parent.__dict__.get(key)
    if stand is None or stand.weight is not lin.weight or stand.bias is not lin.bias:
        stand = parent.__dict__[key] = OneRowLinear(lin)
    return stand


@contextmanager
def gemv_projections(model: nn.Module):
    """Inside, one-row calls of the attention projections of ``model`` on a GPU run ``gemv``: the
    fused q/k/v GEMM of ``cmoe.fused_qkv`` (enter that first) and every plain ``nn.Linear`` named
    in PROJECTIONS; put back on exit. Adapters (peft) and offloaded layers are left alone."""
    swapped, qkvs = [], []
    for parent in model.modules():
        if isinstance(parent, _QKV):
            parent.__dict__["linear"] = linear
            qkvs.append(parent)
        for name in PROJECTIONS:
            lin = parent._modules.get(name)
            if type(lin) is nn.Linear and not hasattr(lin, "_hf_hook"):
                setattr(parent, name, _stand_in(parent, name, lin))
                swapped.append((parent, name, lin))
    try:
        yield
    finally:
        for parent, name, lin in swapped:
            setattr(parent, name, lin)
        for qkv in qkvs:
            qkv.__dict__["linear"] = F.linear
