"""Triton kernels for the routed experts, registered as ``EXPERT_IMPLS["triton"]``.

Same function as every other implementation (see ``cmoe.experts``)::

    out[t] = sum_k weight[t, k] * down[e] @ (act(g) * u),   [g; u] = gate_up[e] @ x[t],  e = idx[t, k]

Two paths, chosen from static shapes (so a decode step captures in a CUDA graph):

- few (token, expert) pairs (decode): ``_gemv_gate_up`` reads only the selected experts'
  gate/up rows, one program per (pair, block of m) and fuses act-and-multiply; ``_gemv_down``
  reads the selected experts' down rows, one program per (token, block of d), sums the a
  experts of the token with their routing weights in registers and writes ``out`` once.
- many pairs (prefill, large batches): pairs are sorted by expert on the device and padded
  to tiles of ``BT`` rows (``align``: one Triton program for moderate counts, sort-based torch
  ops beyond); ``_grouped_gate_up`` is a grouped GEMM with gate and up fused and the
  activation in the epilogue; ``_grouped_down`` multiplies by the routing weight and writes
  each pair's row; the ``a`` rows of a token are then summed (deterministic, no atomics).

Both paths are wrapped in ``torch.library.custom_op("cmoe::triton_experts")`` with a fake
(meta) implementation, so ``torch.compile(fullgraph=True)`` treats them as one opaque op.
No ``.item()``, no host synchronisation, and every buffer has a shape fixed by (T, a, E).

On a machine without a GPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1``
is set before this module is imported (the tests do so); bf16 products are then upcast to
float32 because the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations
from .experts import register

_INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


def _interpreter_fixups() -> None:
    """With TRITON_INTERPRET=1 set only after ``triton.language`` was imported (torch._dynamo
    imports it), Triton's own ``@jit`` library functions (tl.zeros, tl.sum, ...) stay compiled-mode
    and the interpreter cannot call them: re-wrap them as interpreted functions."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    mods = [tl, tl.standard, tl.math, tl.core]
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                setattr(mod, name, InterpretedFunction(obj.fn))


if _INTERPRET and isinstance(getattr(tl, "zeros", None), triton.runtime.jit.JITFunction):
    _interpreter_fixups()

_ACT_CODE = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}

# Path and tile choices (tuned on an H200, see docs/benchmarks/speed-h200.md).
GEMV_MAX_PAIRS = 4  # T * a up to this: the GEMV (decode) path
ALIGN_KERNEL_MAX_PAIRS = 8192  # above: sort-based alignment with torch ops


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g * tl.sigmoid(g)
    elif ACT == 1:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g * sigmoid(2 z)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * z)
    elif ACT == 2:  # gelu, erf
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # relu
        return tl.maximum(g, 0.0)


# ----------------------------------------------------------------------------- GEMV path
@triton.jit
def _gemv_gate_up(
    x_ptr, idx_ptr, w_ptr, h_ptr,  # x [T, d], idx [P], gate_up [E, 2m, d], h [P, m] fp32
    d, m,
    A: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)  # (token, slot) pair
    t = p // A
    e = tl.load(idx_ptr + p).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < m
    wg = w_ptr + e * (2 * m) * d + offs_n[:, None].to(tl.int64) * d  # [BN, 1] gate rows
    wu = wg + m * d  # up rows
    acc_g = tl.zeros((BN, BK), tl.float32)
    acc_u = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xk = tl.load(x_ptr + t * d + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mk = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(wg + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
        acc_u += tl.load(wu + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    tl.store(h_ptr + p * m + offs_n, _act(g, ACT) * u, mask=n_ok)


@triton.jit
def _gemv_down(
    h_ptr, idx_ptr, wt_ptr, w_ptr, out_ptr,  # h [P, m] fp32, idx/wt [P], down [E, d, m], out [T, d]
    d, m,
    A: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    acc = tl.zeros((BN, BK), tl.float32)
    for k in tl.static_range(A):
        p = t * A + k
        e = tl.load(idx_ptr + p).to(tl.int64)
        rw = tl.load(wt_ptr + p).to(tl.float32)
        wd = w_ptr + e * d * m + offs_n[:, None].to(tl.int64) * m  # [BN, 1]
        for k0 in range(0, m, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < m
            hk = tl.load(h_ptr + p * m + offs_k, mask=k_ok, other=0.0) * rw
            acc += tl.load(wd + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32) * hk[None, :]
    y = tl.sum(acc, 1)
    tl.store(out_ptr + t * d + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


# (BN rows, BK columns, num_warps) of the two GEMV kernels; BN shrinks until the grid has
# enough programs to fill the GPU
GEMV_CONFIG = {"gate_up": (4, 1024, 4), "down": (8, 512, 4)}
GEMV_MIN_PROGRAMS = 264  # about 2 per SM of an H200


def _gemv_bn(bn: int, rows: int, programs_other: int) -> int:
    while bn > 1 and triton.cdiv(rows, bn) * programs_other < GEMV_MIN_PROGRAMS:
        bn //= 2
    return bn


def _gemv_experts(x, idx, weight, gate_up, down, act: str, cfg: dict | None = None) -> torch.Tensor:
    cfg = cfg or GEMV_CONFIG
    T, a = idx.shape
    d = x.shape[1]
    m = down.shape[2]
    P = T * a
    h = torch.empty(P, m, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    code = _ACT_CODE[act]
    bn, bk, nw = cfg["gate_up"]
    bn = _gemv_bn(bn, m, P) if not _INTERPRET else 16
    _gemv_gate_up[(triton.cdiv(m, bn), P)](x, idx, gate_up, h, d, m, A=a, ACT=code, BN=bn, BK=bk, num_warps=nw)
    bn, bk, nw = cfg["down"]
    bn = _gemv_bn(bn, d, T) if not _INTERPRET else 16
    _gemv_down[(triton.cdiv(d, bn), T)](h, idx, weight, down, out, d, m, A=a, BN=bn, BK=bk, num_warps=nw)
    return out


# ----------------------------------------------------------------------------- alignment
@triton.jit
def _align_kernel(
    idx_ptr, sorted_ptr, tile_expert_ptr,  # idx [P]; sorted [max_tiles * BT]; tile_expert [max_tiles]
    P, E, max_tiles,
    BT: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: pairs grouped by expert (stable), each group padded to a multiple of BT
    with the sentinel P; tile_expert[i] = expert of tile i, -1 past the last tile."""
    tile_off = 0
    for e in range(E):
        cnt = 0
        for start in range(0, P, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            v = tl.load(idx_ptr + offs, mask=offs < P, other=-1)
            hit = (v == e).to(tl.int32)
            rank = tl.cumsum(hit, 0) - 1 + cnt
            tl.store(sorted_ptr + tile_off * BT + rank, offs, mask=hit > 0)
            cnt += tl.sum(hit, 0)
        ntiles = (cnt + BT - 1) // BT
        pad = cnt + tl.arange(0, BT)
        tl.store(sorted_ptr + tile_off * BT + pad, P + tl.zeros((BT,), tl.int32), mask=pad < ntiles * BT)
        for t0 in range(0, ntiles, CHUNK):
            tt = t0 + tl.arange(0, CHUNK)
            tl.store(tile_expert_ptr + tile_off + tt, e + tl.zeros((CHUNK,), tl.int32), mask=tt < ntiles)
        tile_off += ntiles
    for t0 in range(tile_off, max_tiles, CHUNK):
        tt = t0 + tl.arange(0, CHUNK)
        tl.store(tile_expert_ptr + tt, tl.full((CHUNK,), -1, tl.int32), mask=tt < max_tiles)


def align(idx: torch.Tensor, num_experts: int, bt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (flattened ``idx``) grouped by expert and padded to tiles of ``bt`` rows.

    Returns ``sorted_ids [max_tiles * bt] int32`` (pair index, or P for padding) and
    ``tile_expert [max_tiles] int32`` (-1 for unused tiles); ``max_tiles = ceil(P / bt) + E``
    bounds the tiles any routing can need, so shapes do not depend on the routing.
    """
    flat = idx.reshape(-1)
    P, E = flat.numel(), num_experts
    max_tiles = triton.cdiv(P, bt) + E
    if P <= ALIGN_KERNEL_MAX_PAIRS:
        sorted_ids = torch.empty(max_tiles * bt, device=idx.device, dtype=torch.int32)
        tile_expert = torch.empty(max_tiles, device=idx.device, dtype=torch.int32)
        _align_kernel[(1,)](flat, sorted_ids, tile_expert, P, E, max_tiles, BT=bt, CHUNK=1024, num_warps=8)
        return sorted_ids, tile_expert
    # many pairs: parallel torch ops, still static shapes and no host sync
    counts = torch.zeros(E, device=idx.device, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    ntiles = (counts + bt - 1) // bt
    tile_end = ntiles.cumsum(0)  # [E]
    order = flat.argsort(stable=True)  # [P]
    se = flat[order]
    rank = torch.arange(P, device=idx.device) - (counts.cumsum(0) - counts)[se]
    dest = (tile_end - ntiles)[se] * bt + rank
    sorted_ids = torch.full((max_tiles * bt,), P, device=idx.device, dtype=torch.int32)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    tiles = torch.arange(max_tiles, device=idx.device)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True)
    tile_expert = torch.where(tile_expert < E, tile_expert, -1).to(torch.int32)
    return sorted_ids, tile_expert


# ----------------------------------------------------------------------------- grouped GEMM path
@triton.jit
def _grouped_gate_up(
    x_ptr, w_ptr, h_ptr, sorted_ptr, tile_expert_ptr,  # x [T, d]; gate_up [E, 2m, d]; h [max_tiles*BT, m]
    P, d, m, num_tiles,
    A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(m, BN)
    # grouped ordering: GROUP token tiles sweep the n blocks together (weights reused in L2)
    in_group = GROUP * n_blocks
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_tiles - first, GROUP)
    tile = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    e = e.to(tl.int64)
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    tok = (pair // A).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < m
    wg = w_ptr + e * (2 * m) * d + offs_n[None, :].to(tl.int64) * d  # [1, BN]
    wu = wg + m * d
    acc_g = tl.zeros((BT, BN), tl.float32)
    acc_u = tl.zeros((BT, BN), tl.float32)
    for k0 in range(0, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xk = tl.load(x_ptr + tok[:, None] * d + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        mk = k_ok[:, None] & n_ok[None, :]
        bg = tl.load(wg + offs_k[:, None], mask=mk, other=0.0)  # [BK, BN]
        bu = tl.load(wu + offs_k[:, None], mask=mk, other=0.0)
        if UPCAST:
            xk, bg, bu = xk.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        if IEEE:
            acc_g = tl.dot(xk, bg, acc_g, input_precision="ieee")
            acc_u = tl.dot(xk, bu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(xk, bg, acc_g)
            acc_u = tl.dot(xk, bu, acc_u)
    hv = _act(acc_g, ACT) * acc_u
    tl.store(h_ptr + rows[:, None].to(tl.int64) * m + offs_n[None, :], hv.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _grouped_down(
    h_ptr, w_ptr, wt_ptr, y_ptr, sorted_ptr, tile_expert_ptr,  # h [max_tiles*BT, m]; down [E, d, m]; wt [P]; y [P, d]
    P, d, m, num_tiles,
    BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(d, BN)
    in_group = GROUP * n_blocks
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_tiles - first, GROUP)
    tile = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    e = e.to(tl.int64)
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    wd = w_ptr + e * d * m + offs_n[None, :].to(tl.int64) * m  # [1, BN]
    acc = tl.zeros((BT, BN), tl.float32)
    for k0 in range(0, m, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < m
        hk = tl.load(h_ptr + rows[:, None].to(tl.int64) * m + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        bd = tl.load(wd + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        if UPCAST:
            hk, bd = hk.to(tl.float32), bd.to(tl.float32)
        if IEEE:
            acc = tl.dot(hk, bd, acc, input_precision="ieee")
        else:
            acc = tl.dot(hk, bd, acc)
    rw = tl.load(wt_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    tl.store(y_ptr + pair[:, None].to(tl.int64) * d + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


# tile shapes of the grouped path, by number of (token, expert) pairs: BT rows per tile, then
# (BN, BK, num_warps, num_stages) of gate_up and of down (H200 sweep, benchmarks/bench_experts.py)
GROUPED_CONFIGS = [
    (32, dict(bt=16, gate_up=(32, 256, 4, 3), down=(64, 256, 4, 3))),  # decode, few pairs per expert
    (512, dict(bt=64, gate_up=(64, 64, 4, 4), down=(128, 64, 4, 4))),
    (None, dict(bt=128, gate_up=(128, 64, 8, 3), down=(256, 64, 8, 3))),  # prefill
]


def grouped_config(pairs: int) -> dict:
    for limit, cfg in GROUPED_CONFIGS:
        if limit is None or pairs <= limit:
            return cfg
    raise AssertionError


def _grouped_experts(x, idx, weight, gate_up, down, act: str, cfg: dict | None = None) -> torch.Tensor:
    T, a = idx.shape
    d = x.shape[1]
    E, m = down.shape[0], down.shape[2]
    P = T * a
    cfg = cfg or grouped_config(P)
    bt = cfg["bt"]
    sorted_ids, tile_expert = align(idx, E, bt)
    num_tiles = tile_expert.numel()
    h = torch.empty(num_tiles * bt, m, device=x.device, dtype=x.dtype)
    upcast = _INTERPRET and x.dtype != torch.float32
    ieee = x.dtype == torch.float32
    code = _ACT_CODE[act]
    bn, bk, nw, ns = cfg["gate_up"]
    gm = cfg.get("group", 8)
    grid = (num_tiles * triton.cdiv(m, bn),)
    _grouped_gate_up[grid](
        x, gate_up, h, sorted_ids, tile_expert, P, d, m, num_tiles,
        A=a, ACT=code, BT=bt, BN=bn, BK=bk, GROUP=gm, UPCAST=upcast, IEEE=ieee, num_warps=nw, num_stages=ns,
    )
    y = torch.empty(P, d, device=x.device, dtype=x.dtype)
    bn, bk, nw, ns = cfg["down"]
    grid = (num_tiles * triton.cdiv(d, bn),)
    _grouped_down[grid](
        h, down, weight.reshape(-1), y, sorted_ids, tile_expert, P, d, m, num_tiles,
        BT=bt, BN=bn, BK=bk, GROUP=gm, UPCAST=upcast, IEEE=ieee, num_warps=nw, num_stages=ns,
    )
    if a == 1:
        return y
    return y.view(T, a, d).sum(1, dtype=torch.float32).to(x.dtype) if x.dtype != torch.float32 else y.view(T, a, d).sum(1)


# ----------------------------------------------------------------------------- fused router
@triton.jit
def _route_scores(x_ptr, g_ptr, u_ptr, rows, r_ok, offs_e, e_ok, d, k_start, k_stop,
                  BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """<x, g_j> and <x, u_j> over columns [k_start, k_stop) of d: two [BT, BE] float32 blocks."""
    acc_g = tl.zeros((BT, BE), tl.float32)
    acc_u = tl.zeros((BT, BE), tl.float32)
    for k0 in range(k_start, k_stop, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xk = tl.load(x_ptr + rows[:, None].to(tl.int64) * d + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        mk = k_ok[:, None] & e_ok[None, :]
        gk = tl.load(g_ptr + offs_e[None, :] * d + offs_k[:, None], mask=mk, other=0.0)  # [BK, BE]
        uk = tl.load(u_ptr + offs_e[None, :] * d + offs_k[:, None], mask=mk, other=0.0)
        if IEEE:
            xk, gk, uk = xk.to(tl.float32), gk.to(tl.float32), uk.to(tl.float32)
            acc_g = tl.dot(xk, gk, acc_g, input_precision="ieee")
            acc_u = tl.dot(xk, uk, acc_u, input_precision="ieee")
        else:
            if UPCAST:
                xk, gk, uk = xk.to(tl.float32), gk.to(tl.float32), uk.to(tl.float32)
            acc_g = tl.dot(xk, gk, acc_g)
            acc_u = tl.dot(xk, uk, acc_u)
    return acc_g, acc_u


@triton.jit
def _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E,
                  A: tl.constexpr, ACT: tl.constexpr, BE: tl.constexpr):
    """scores |u * act(g)| -> p = softmax, top-A of p + b (first index on ties), weights 1 + p * v."""
    s = tl.abs(u * _act(g, ACT))
    s = tl.where(e_ok[None, :], s, float("-inf"))
    s = tl.exp(s - tl.max(s, 1)[:, None])
    p = s / tl.sum(s, 1)[:, None]  # [BT, BE]
    tl.store(p_ptr + rows[:, None] * E + offs_e[None, :], p, mask=r_ok[:, None] & e_ok[None, :])
    b = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    sel = tl.where(e_ok[None, :], p + b[None, :], float("-inf"))
    for k in tl.static_range(A):
        best = tl.max(sel, 1)
        j = tl.min(tl.where(sel == best[:, None], offs_e[None, :], BE), 1)
        hit = offs_e[None, :] == j[:, None]
        pj = tl.sum(tl.where(hit, p, 0.0), 1)
        vj = tl.load(scale_ptr + j, mask=r_ok & (j < E), other=0.0).to(tl.float32)
        tl.store(idx_ptr + rows * A + k, j.to(tl.int64), mask=r_ok)
        tl.store(wt_ptr + rows * A + k, 1.0 + pj * vj, mask=r_ok)
        sel = tl.where(hit, float("-inf"), sel)


@triton.jit
def _route_kernel(
    x_ptr, g_ptr, u_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr,  # x [T, d]; g, u [E, d]; idx, wt [T, A]; p [T, E]
    T, d, E,
    A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Many tokens: the analytical router (method.md section 5) in one pass per tile of BT tokens."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g, u = _route_scores(x_ptr, g_ptr, u_ptr, rows, r_ok, offs_e, e_ok, d, 0, d, BT, BE, BK, UPCAST, IEEE)
    _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E, A, ACT, BE)


@triton.jit
def _route_partial_kernel(
    x_ptr, g_ptr, u_ptr, part_ptr,  # part [SPLITS, 2, rows_pad, BE] float32
    T, d, rows_pad, E, KPER,
    BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Few tokens: partial scores over one slice of d (programs: token tiles x slices of d)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g, u = _route_scores(x_ptr, g_ptr, u_ptr, rows, r_ok, offs_e, e_ok, d, split * KPER, split * KPER + KPER, BT, BE, BK, UPCAST, IEEE)
    out = part_ptr + split * 2 * rows_pad * BE + rows[:, None] * BE + offs_e[None, :]
    tl.store(out, g)
    tl.store(out + rows_pad * BE, u)


@triton.jit
def _route_reduce_kernel(
    part_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr,
    T, rows_pad, E, SPLITS,
    A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
):
    """Few tokens: sum the partial scores of every slice (fixed order: deterministic), then finish."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g = tl.zeros((BT, BE), tl.float32)
    u = tl.zeros((BT, BE), tl.float32)
    ptr = part_ptr + rows[:, None] * BE + offs_e[None, :]
    for sp in range(SPLITS):
        g += tl.load(ptr + sp * 2 * rows_pad * BE)
        u += tl.load(ptr + sp * 2 * rows_pad * BE + rows_pad * BE)
    _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E, A, ACT, BE)


ROUTE_SPLIT_MAX_TOKENS = 256  # up to this many tokens: scores split over slices of d (two kernels)
ROUTE_SPLIT_K = 256  # columns of d per slice


@torch.library.custom_op("cmoe::triton_route", mutates_args=())
def triton_route_op(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, act: str, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, d = x.shape
    E = gate.shape[0]
    idx = torch.empty(T, top_k, device=x.device, dtype=torch.int64)
    wt = torch.empty(T, top_k, device=x.device, dtype=torch.float32)
    p = torch.empty(T, E, device=x.device, dtype=torch.float32)
    if T == 0:
        return idx, wt, p
    x, gate, up = x.contiguous(), gate.contiguous(), up.contiguous()
    ieee = gate.dtype == torch.float32 or x.dtype == torch.float32 or gate.dtype != x.dtype
    be = max(16, triton.next_power_of_2(E))
    upcast = _INTERPRET and not ieee
    code = _ACT_CODE[act]
    if T <= ROUTE_SPLIT_MAX_TOKENS:
        bt = 16
        tiles = triton.cdiv(T, bt)
        bk = 64 if _INTERPRET else 128
        kper = triton.cdiv(ROUTE_SPLIT_K, bk) * bk
        splits = triton.cdiv(d, kper)
        part = torch.empty(splits, 2, tiles * bt, be, device=x.device, dtype=torch.float32)
        _route_partial_kernel[(tiles, splits)](
            x, gate, up, part, T, d, tiles * bt, E, kper, BT=bt, BE=be, BK=bk, UPCAST=upcast, IEEE=ieee, num_warps=4
        )
        _route_reduce_kernel[(tiles,)](
            part, bias, scale, idx, wt, p, T, tiles * bt, E, splits, A=top_k, ACT=code, BT=bt, BE=be, num_warps=4
        )
        return idx, wt, p
    bt = 64
    _route_kernel[(triton.cdiv(T, bt),)](
        x, gate, up, bias, scale, idx, wt, p, T, d, E,
        A=top_k, ACT=code, BT=bt, BE=be, BK=64, UPCAST=upcast, IEEE=ieee, num_warps=4,
    )
    return idx, wt, p


@triton_route_op.register_fake
def _(x, gate, up, bias, scale, act, top_k):
    T, E = x.shape[0], gate.shape[0]
    return (
        x.new_empty(T, top_k, dtype=torch.int64),
        x.new_empty(T, top_k, dtype=torch.float32),
        x.new_empty(T, E, dtype=torch.float32),
    )


def fused_route(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``router(x)`` of an ``AnalyticalRouter`` in one kernel: (idx [T, a], weight [T, a], probs [T, E])."""
    return triton_route_op(
        x, router.gate, router.up, router.bias, router.scale, activations.canonical(router.act), router.top_k
    )


# ----------------------------------------------------------------------------- the op
def _check(x, idx, weight, gate_up, down, act):
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "the 'triton' expert implementation needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            "importing cmoe.triton_experts); use impl='grouped' or 'gather' on the CPU"
        )
    if act not in _ACT_CODE:
        raise ValueError(f"activation {act!r} not supported by the Triton kernels; supported: {sorted(_ACT_CODE)}")


@torch.library.custom_op("cmoe::triton_experts", mutates_args=())
def triton_experts_op(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: str
) -> torch.Tensor:
    _check(x, idx, weight, gate_up, down, act)
    T, a = idx.shape
    if T == 0 or a == 0:
        return torch.zeros_like(x)
    x, idx, weight = x.contiguous(), idx.contiguous(), weight.contiguous().float()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    if T * a <= GEMV_MAX_PAIRS:
        return _gemv_experts(x, idx, weight, gate_up, down, act)
    return _grouped_experts(x, idx, weight, gate_up, down, act)


@triton_experts_op.register_fake
def _(x, idx, weight, gate_up, down, act):
    return torch.empty_like(x)


@register("triton")
def triton_experts(x, idx, weight, gate_up, down, act: str) -> torch.Tensor:
    """Triton kernels: a GEMV over the selected experts for few pairs, a grouped GEMM beyond."""
    return triton_experts_op(x, idx, weight, gate_up, down, activations.canonical(act))


