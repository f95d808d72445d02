"""Triton kernels for the routed experts, registered as ``EXPERT_IMPLS["triton"]``.

Same function as every other implementation (see ``cmoe.experts``)::

    out[t] = sum_k weight[t, k] * down[e] @ (act(g) * u),   [g; u] = gate_up[e] @ x[t],  e = idx[t, k]

Three expert paths, chosen from static shapes (so a decode step captures in a CUDA graph):

- very few (token, expert) pairs (decode at batch 1): ``_gemv_gate_up`` reads only the selected
  experts' gate/up rows, one program per (pair, block of m) and fuses act-and-multiply;
  ``_gemv_down`` reads the selected experts' down rows, one program per (token, block of d),
  sums the a experts of the token with their routing weights in registers and writes ``out``
  once.
- few tokens (up to ``FEW_MAX_TOKENS``): ``_few_gate_up`` multiplies every token by each used
  expert's weights, read once; ``_few_down`` does the same per group of experts (tokens that did
  not choose an expert get weight 0) and writes one partial sum per group.
- many pairs (larger batches, prefill): pairs are grouped by expert on the device and padded to
  tiles of ``BT`` rows (``align``: two Triton kernels, one program per 256 pairs, that count and
  then place them; sort-based torch ops for very many); ``_grouped_gate_up`` is a grouped GEMM
  with gate and up fused (at prefill sizes as one product over interleaved gate and up rows,
  ``paired``) and the activation in the epilogue; ``_grouped_down`` multiplies by the routing
  weight and writes each pair's row.
- prefill in bf16 on Hopper, once every expert gets ``GROUPED_MM_MIN_ROWS`` rows on average:
  torch's grouped GEMM (``torch._grouped_mm``, CUTLASS) for both projections, with our kernels
  for the glue (the activation, and each token's weighted sum plus the shared expert in one pass;
  in a compiled model, for top-k up to ``GMM_ROWS_MAX_SLOTS``, that sum in torch ops for inductor to
  fuse into the residual add instead).

Beyond ``SHARED_FOLD_MAX_TOKENS`` tokens cuBLAS runs the shared expert, on a second CUDA stream
(``SHARED_STREAM``), beside the routed path's small kernels (sort, gather, alignment) and GEMMs; on
the grouped path it writes its output as one more slot beside the routed slots, which the caller
sums (``PREFILL_SLOTS``).

Given the shared expert's weights too, every path computes the whole FFN: the shared expert's
neurons become ``S = ceil(ms / m)`` extra pieces that every token selects with weight 1, so a
decode layer is two launches (up to ``SHARED_FOLD_MAX_TOKENS`` tokens; beyond, cuBLAS runs the
shared expert, which it does faster at prefill sizes). The router (analytical or linear) has
its own fused kernels (``fused_route``).

Three whole-layer ops take the router in too (``layer_forward``; ``CMoEMLP`` picks them):

- the GEMV path as one op (``gemv_moe``, decode at batch 1 in layers with a shared expert,
  ``GEMV_LAYER_OP``): the router and every slot's gate/up GEMV in one launch, in which the
  routed slots' programs wait on the device for the router's (``_gemv_route_gate_up``); then
  the down GEMV.

For the batches whose routing touches every expert:

- the masked path (``masked_moe``, 2-64 tokens, ``use_masked``): the whole layer, router
  included, in two kernels; every token through every expert's gate/up, the routing applied
  in the down kernel. No separate router, no alignment.
- the dense path (``dense_moe``, 128-384 tokens for layers with half or more of their neurons
  active, ``use_dense``): cuBLAS on every neuron with the routing as a mask, in one op, with the
  router and the shared expert on a second stream beside the routed experts' gate/up GEMM.
  Layers whose routing is asked for (load counts, probabilities) or whose shared expert carries
  an adapter take the same GEMMs as torch ops (``cmoe.experts.dense_experts``).

The paths are wrapped in ``torch.library.custom_op("cmoe::triton_experts")`` with a fake
(meta) implementation, so ``torch.compile(fullgraph=True)`` treats them as one opaque op.
No ``.item()``, no host synchronisation, and every buffer has a shape fixed by (T, a, E).
The op returns ``[T, K, d]`` (``_slots``: one row per pair on the grouped path, per group of
experts on the few-token path, K = 1 on the GEMV path) and ``triton_experts`` sums over K, in
a fixed order, with no atomics; in a compiled model that sum fuses into the next kernel.

On a machine without a GPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1``
is set before this module is imported (the tests do so); bf16 products are then upcast to
float32 because the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations, pdl
from .experts import dense_experts, expert_counts, expert_order, grouped_pairs, register, shared_expert, sort_by_expert

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

# Path and tile choices (tuned on an H200, see docs/benchmarks/speed-h200-log.md).
GEMV_MAX_PAIRS = 4  # T * a up to this: the GEMV (decode) path
# the alignment kernels while their per-chunk counts (chunks x experts) are at most this many; beyond,
# sort-based torch ops (each program reads every count: H200, 3.5-13.7x faster than the torch ops up to
# 32,768 counts, 0.52x at 131,072; docs/benchmarks/speed-h200-log.md, run u)
ALIGN_KERNEL_MAX_COUNTS = 32768
ALIGN_CHUNK = 256  # pairs per program of the alignment kernels
ALIGN_COUNT_BLOCK = 4096  # per-chunk counts (chunks x experts) per load in the placing kernel


# ----------------------------------------------------------------------------- helpers
_STREAM_FLAGS: dict = {}


def stream_flags(name: str, n: int, device: torch.device) -> torch.Tensor:
    """[n] int32 zeros kept across calls, for the kernels called ``name`` on ``device`` and its
    current stream: flags or tickets that those kernels set back to 0 before the next launch, so
    that no kernel has to zero them first. One buffer per stream, as launches on one stream run one
    after the other; CUDA graphs captured on one stream share its buffer, so they must not be
    replayed at the same time on different streams (as for graphs that share a memory pool). A
    buffer first asked for while a CUDA graph is being captured is zeroed by that graph at each
    replay too."""
    key = (name, device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    if key not in _STREAM_FLAGS:
        _STREAM_FLAGS[key] = torch.zeros(n, device=device, dtype=torch.int32)
    return _STREAM_FLAGS[key]


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


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b, accumulated in float32. UPCAST (the interpreter's bf16 dot is wrong) or IEEE
    (float32 inputs, or mixed ones): the operands in float32; IEEE: exact float32 products."""
    if UPCAST or IEEE:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _matmul_pair(x_ptr, rows, r_ok, wg, wu, n_ok, d, k_start, k_stop,
                 R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 EVICT: tl.constexpr, FIRST_ONLY: tl.constexpr):
    """Rows ``rows`` [R] of x [*, d] (``r_ok``: which exist) times two weight blocks given by
    pointers to the start of each of their BN rows, ``wg`` and ``wu`` [BN] (``n_ok``: which
    exist), over columns [k_start, k_stop) of d: two [R, BN] float32 blocks (FIRST_ONLY: ``wu``
    is not read and the second block stays 0). Expert gate/up rows, router rows alike."""
    acc_g = tl.zeros((R, BN), tl.float32)
    acc_u = tl.zeros((R, BN), tl.float32)
    for k0 in range(k_start, k_stop, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xk = tl.load(x_ptr + rows[:, None] * d + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        mk = k_ok[:, None] & n_ok[None, :]
        bg = tl.load(wg[None, :] + offs_k[:, None], mask=mk, other=0.0, eviction_policy=EVICT)  # [BK, BN]
        acc_g = _dot(xk, bg, acc_g, UPCAST, IEEE)
        if not FIRST_ONLY:
            bu = tl.load(wu[None, :] + offs_k[:, None], mask=mk, other=0.0, eviction_policy=EVICT)
            acc_u = _dot(xk, bu, acc_u, UPCAST, IEEE)
    return acc_g, acc_u


@triton.jit
def _matmul_paired(x_ptr, rows, r_ok, w, w_ok, d,
                   R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   EVEN_K: tl.constexpr):
    """The gate and up blocks of ``_matmul_pair`` through one [R, 2 BN] product: ``w`` [2 BN]
    points to neuron i's gate row at 2i and its up row at 2i + 1 (``w_ok``: which exist), so that
    the accumulator splits into the two in registers (each thread holds pairs of neighbouring
    columns), and each step is one wgmma of twice the width instead of two. EVEN_K: d is a
    multiple of BK (no column mask)."""
    acc = tl.zeros((R, 2 * BN), tl.float32)
    for k0 in range(0, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            xk = tl.load(x_ptr + rows[:, None] * d + offs_k[None, :], mask=r_ok[:, None], other=0.0)
            b = tl.load(w[None, :] + offs_k[:, None], mask=w_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < d
            xk = tl.load(x_ptr + rows[:, None] * d + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w[None, :] + offs_k[:, None], mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        acc = _dot(xk, b, acc, UPCAST, IEEE)
    return acc.reshape(R, BN, 2).split()


@triton.jit
def _down_block(acc, h_rows, r_ok, wd, n_ok, m, k_end,
                BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, EVICT: tl.constexpr):
    """acc [R, BN] + h @ W^T: activations from the pointers to column 0 of each of R rows,
    ``h_rows`` [R] (``r_ok``: which exist), down-projection rows from ``wd`` [BN] (``n_ok``),
    over the first ``k_end`` of the m columns."""
    for k0 in range(0, m, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < k_end
        hk = tl.load(h_rows[:, None] + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        bd = tl.load(wd[None, :] + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy=EVICT)
        acc = _dot(hk, bd, acc, UPCAST, IEEE)
    return acc


# ----------------------------------------------------------------------------- GEMV path
# The shared expert (``shared_gate_up [2 ms, d]``, gate rows first, ``shared_down [d, ms]``) rides
# along as S = ceil(ms / m) pieces of m neurons that every token selects with weight 1: slots
# 0..S-1 of each token are the shared pieces, slots S..S+A-1 its routed experts. ``sw_ptr`` /
# ``sd_ptr`` are never read when S = 0. The grouped and few-token paths number the pieces the
# same way, as "virtual experts" 0..S-1, followed by the routed experts S..S+E-1.
@triton.jit
def _gate_up_rows(w_ptr, sw_ptr, e, offs_n, d, m, ms, S: tl.constexpr):
    """Virtual expert e, neurons offs_n [BN]: (pointers to their gate rows, the offset from a
    gate row to its up row, which neurons exist). Selects with ``tl.where``, not ``if``: Triton
    3.6 loses the pointers' alignment through an ``if`` and then loads one element at a time."""
    e = tl.cast(e, tl.int64)  # e may be a plain int (a loop counter)
    shared = e < S  # a piece of the shared expert: rows e*m.. of shared_gate_up [2ms, d]
    row = tl.where(shared, e * m, (e - S) * (2 * m)) + offs_n  # else rows of gate_up [E, 2m, d]
    wg = tl.where(shared, sw_ptr, w_ptr) + row * d
    n_ok = offs_n < tl.where(shared, tl.minimum(m, ms - e * m), m)
    return wg, tl.where(shared, ms, m) * d, n_ok


@triton.jit
def _down_rows(w_ptr, sd_ptr, e, offs_n, d, m, ms, S: tl.constexpr):
    """Virtual expert e, output rows offs_n [BN] of d: (pointers to the start of those rows of
    its down projection, how many of its m columns exist); ``tl.where`` as in _gate_up_rows."""
    e = tl.cast(e, tl.int64)  # e may be a plain int (a loop counter)
    shared = e < S  # a piece of the shared expert: columns e*m.. of shared_down [d, ms]
    start = tl.where(shared, e * m, (e - S) * d * m)  # else down [E, d, m]
    wd = tl.where(shared, sd_ptr, w_ptr) + start + offs_n.to(tl.int64) * tl.where(shared, ms, m)
    k_end = tl.where(shared, tl.minimum(m, ms - e * m), m).to(tl.int32)
    return wd, k_end


@triton.jit
def _gemv_gate_up_tile(x_ptr, w_ptr, sw_ptr, h_ptr, t, slot, e, pid_n, d, m, ms,
                       A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PDL: tl.constexpr):
    """h[t, slot, BN neurons from pid_n * BN] = act(gate) * up of token t through virtual expert e.
    PDL: the first block of weights read before ``pdl.wait``, then x (cmoe.pdl)."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    wg, up, n_ok = _gate_up_rows(w_ptr, sw_ptr, e, offs_n, d, m, ms, S)
    wg = wg[:, None]  # [BN, 1] gate rows
    wu = wg + up
    acc_g = tl.zeros((BN, BK), tl.float32)
    acc_u = tl.zeros((BN, BK), tl.float32)
    k_first = 0
    if PDL:
        offs_k = tl.arange(0, BK)
        k_ok = offs_k < d
        mk = n_ok[:, None] & k_ok[None, :]
        g0 = tl.load(wg + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first")
        u0 = tl.load(wu + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first")
        pdl.wait(PDL)
        xk = tl.load(x_ptr + t * d + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += g0.to(tl.float32) * xk
        acc_u += u0.to(tl.float32) * xk
        k_first = BK
    for k0 in range(k_first, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xk = tl.load(x_ptr + t * d + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mk = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(wg + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
        acc_u += tl.load(wu + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    tl.store(h_ptr + (t * (S + A) + slot) * m + offs_n, _act(g, ACT) * u, mask=n_ok)


@triton.jit
def _gemv_gate_up(
    x_ptr, idx_ptr, w_ptr, sw_ptr, h_ptr,  # x [T, d], idx [T, A], gate_up [E, 2m, d], shared_gate_up [2ms, d], h [T, S+A, m] fp32
    d, m, ms,
    A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)  # (token, slot) pair
    t = p // (S + A)
    slot = p % (S + A)
    e = slot.to(tl.int64)  # virtual expert: a shared piece, or the routed expert chosen in this slot
    if slot >= S:
        e = tl.load(idx_ptr + t * A + slot - S).to(tl.int64) + S
    _gemv_gate_up_tile(x_ptr, w_ptr, sw_ptr, h_ptr, t, slot, e, pid_n, d, m, ms, A, S, ACT, BN, BK, False)


@triton.jit
def _gemv_route_gate_up(
    x_ptr, idx_ptr, w_ptr, sw_ptr, h_ptr,  # as in _gemv_gate_up; idx [T, A] is written here
    rg_ptr, ru_ptr, bias_ptr, scale_ptr, wt_ptr, p_ptr, part_ptr, sync_ptr,  # the router's; sync [2] int32, zeros
    T, d, m, ms, E, KPER, NB,
    A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLITS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, RBK: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, LINEAR: tl.constexpr, PDL: tl.constexpr,
):
    """The router and every slot's gate/up GEMV in one launch (T <= BT tokens). Programs 0 ..
    SPLITS-1 compute the router's partial scores over slices of d; the last of them to finish (a
    ticket in sync[0]) sums them, stores the routing and sets sync[1]. The GEMV programs follow,
    the shared pieces' first; a routed slot's programs wait on the device for sync[1] before they
    read their expert. This relies on lower program ids starting first, so that the router's
    programs never wait for a slot behind programs that wait for them. The H200 does so (every
    run of the benchmark and the GPU tests), but CUDA does not document it; a ticket taken at
    each program's start would give the order without relying on it. The interpreter runs
    programs in order. With PDL the shared pieces' programs read their first block of weights
    before they wait for the kernel before (cmoe.pdl), the others wait first."""
    pid = tl.program_id(0)
    if pid < SPLITS:
        pdl.wait(PDL)
        _route_partial(x_ptr, rg_ptr, ru_ptr, part_ptr, 0, pid, T, d, BT, E, KPER, BT, BE, RBK, UPCAST, IEEE, LINEAR)
        tl.debug_barrier()  # every thread's partial scores stored before the ticket (release)
        if tl.atomic_add(sync_ptr, 1) == SPLITS - 1:
            _route_reduce(part_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, 0, T, BT, E, SPLITS, A, ACT, BT, BE, LINEAR)
            tl.debug_barrier()
            tl.atomic_xchg(sync_ptr + 1, 1)
    else:
        q = pid - SPLITS
        pid_n = q % NB
        pair = q // NB  # slot-major: the shared pieces' programs first
        slot = pair // T
        t = pair % T
        e = slot.to(tl.int64)
        if slot >= S:
            pdl.wait(PDL)
            while tl.load(sync_ptr + 1, volatile=True) == 0:
                pass
            tl.atomic_add(sync_ptr + 1, 0)  # acquire: the routing stored before sync[1] is visible
            e = tl.load(idx_ptr + t * A + slot - S, cache_modifier=".cg").to(tl.int64) + S
        _gemv_gate_up_tile(x_ptr, w_ptr, sw_ptr, h_ptr, t, slot, e, pid_n, d, m, ms, A, S, ACT, BN, BK, PDL)


@triton.jit
def _gemv_down(
    h_ptr, idx_ptr, wt_ptr, w_ptr, sd_ptr, out_ptr,  # h [T, S+A, m] fp32, idx/wt [T, A], down [E, d, m], shared_down [d, ms], out [T, d]
    sync_ptr,  # RESET: the flags of _gemv_route_gate_up [2] int32, set back to 0 for its next launch
    d, m, ms,
    A: tl.constexpr, S: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RESET: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    h_t = h_ptr + t * (S + A) * m
    acc = tl.zeros((BN, BK), tl.float32)
    ws = sd_ptr + offs_n[:, None].to(tl.int64) * ms  # the shared expert's rows (S > 0)
    k_first = 0
    if PDL and S > 0:  # its first block of weights read before waiting for h (cmoe.pdl)
        offs_k = tl.arange(0, BK)
        k_ok = offs_k < ms
        w0 = tl.load(ws + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        pdl.wait(PDL)
        acc += w0.to(tl.float32) * tl.load(h_t + offs_k, mask=k_ok, other=0.0)[None, :]
        k_first = BK
    else:
        pdl.wait(PDL)
    if RESET:  # after the wait: the kernel before reads these flags
        if pid_n + t == 0:
            tl.store(sync_ptr + tl.arange(0, 2), tl.zeros((2,), tl.int32))
    if S > 0:  # the shared pieces' activations are h_t[0:ms], contiguous
        for k0 in range(k_first, ms, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < ms
            hk = tl.load(h_t + offs_k, mask=k_ok, other=0.0)
            acc += tl.load(ws + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32) * hk[None, :]
    for k in tl.static_range(A):
        e = tl.load(idx_ptr + t * A + k).to(tl.int64)
        rw = tl.load(wt_ptr + t * A + k).to(tl.float32)
        wd = w_ptr + e * d * m + offs_n[:, None].to(tl.int64) * m  # [BN, 1]
        for k0 in range(0, m, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < m
            hk = tl.load(h_t + (S + k) * m + offs_k, mask=k_ok, other=0.0) * rw
            acc += tl.load(wd + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32) * hk[None, :]
    y = tl.sum(acc, 1)
    tl.store(out_ptr + t * d + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


# (BN rows, BK columns, num_warps) of the two GEMV kernels; BN shrinks until the grid has
# enough programs to fill the GPU; gate/up's BK is capped at d rounded up to a power of 2.
# H200, 4 layers of llama2-7b/llama3-8b shapes, 1-2 tokens: with gate/up at (2, 2048, 2) the two
# kernels took 0.88-0.99x the time they took with (8, 512, 4), e.g. S2A2E8 at one token 38.3
# against 43.5 us per layer (docs/benchmarks/speed-h200-log.md, "Run q")
GEMV_CONFIG = {"gate_up": (2, 2048, 2), "down": (8, 512, 4)}
GEMV_MIN_PROGRAMS = 264  # about 2 per SM of an H200


def _gemv_bn(bn: int, rows: int, programs_other: int) -> int:
    while bn > 1 and triton.cdiv(rows, bn) * programs_other < GEMV_MIN_PROGRAMS:
        bn //= 2
    return bn


def _shared_pieces(shared, gate_up, down) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(ms, S, shared_gate_up, shared_down): the shared expert's width, its number of m-wide pieces
    (0, 0 without one), and its weights as the kernels take them (contiguous), or ``gate_up`` and
    ``down`` as placeholders that the kernels never read when S = 0. ``shared``: None or
    (shared_gate_up [2ms, d], shared_down [d, ms])."""
    ms = 0 if shared is None else shared[1].shape[1]
    S = triton.cdiv(ms, down.shape[2])
    sgu, sd = (shared[0].contiguous(), shared[1].contiguous()) if S else (gate_up, down)
    return ms, S, sgu, sd


def _gemv_gate_up_tiles(cfg: dict, m: int, d: int, pairs: int) -> tuple[int, int, int]:
    """(BN, BK, num_warps) of a gate/up GEMV launch over ``pairs`` (token, slot) pairs."""
    bn, bk, nw = cfg["gate_up"]
    bn = _gemv_bn(bn, m, pairs) if not _INTERPRET else 16
    return bn, min(bk, triton.next_power_of_2(d)), nw


def _gemv_gate_up_all(x, idx, gate_up, shared_gate_up, h, ms: int, S: int, act: str, cfg: dict) -> None:
    """h (h [T, S + a, m] float32): act(gate) * up of every token's slots."""
    T, d = x.shape
    m = h.shape[2]
    P = T * h.shape[1]
    if not P:
        return
    bn, bk, nw = _gemv_gate_up_tiles(cfg, m, d, P)
    _gemv_gate_up[(triton.cdiv(m, bn), P)](
        x, idx, gate_up, shared_gate_up, h, d, m, ms, A=idx.shape[1], S=S, ACT=_ACT_CODE[act], BN=bn, BK=bk, num_warps=nw,
    )


def _gemv_down_all(h, idx, weight, down, shared_down, ms: int, S: int, cfg: dict, dtype: torch.dtype,
                   sync: torch.Tensor | None = None) -> torch.Tensor:
    """[T, d] in ``dtype``: every slot of h [T, S + a, m] through its down projection, the routed
    ones with their routing weights; ``sync``: flags set back to 0 (``_gemv_route_gate_up``'s)."""
    T, a = idx.shape
    d, m = down.shape[1], down.shape[2]
    out = torch.empty(T, d, device=h.device, dtype=dtype)
    bn, bk, nw = cfg["down"]
    bn = _gemv_bn(bn, d, T) if not _INTERPRET else 16
    pdl_args = pdl.launch(h) if sync is not None else {"PDL": False}  # the batch-1 layer op's kernels only
    _gemv_down[(triton.cdiv(d, bn), T)](h, idx, weight, down, shared_down, out, idx if sync is None else sync, d, m, ms,
                                        A=a, S=S, BN=bn, BK=bk, RESET=sync is not None, num_warps=nw, **pdl_args)
    return out


def _gemv_experts(x, idx, weight, gate_up, down, act: str, cfg: dict | None = None, shared=None) -> torch.Tensor:
    """``shared``: None or (shared_gate_up [2ms, d], shared_down [d, ms]), added to the output."""
    cfg = cfg or GEMV_CONFIG
    T, a = idx.shape
    m = down.shape[2]
    ms, S, sgu, sd = _shared_pieces(shared, gate_up, down)
    h = torch.empty(T, S + a, m, device=x.device, dtype=torch.float32)
    _gemv_gate_up_all(x, idx, gate_up, sgu, h, ms, S, act, cfg)
    return _gemv_down_all(h, idx, weight, down, sd, ms, S, cfg, x.dtype)


# ----------------------------------------------------------------------------- few-token path
# Small batches (decode, up to FEW_MAX_TOKENS tokens): every token's x is multiplied by each *used* expert's
# weights, read once; tokens that did not choose the expert get weight 0 in the down kernel.
# No sort, no padding tiles; one program per (block of m, expert slot) and per block of d.
@triton.jit
def _used_by(idx_ptr, wt_ptr, offs_t, t_ok, e, A: tl.constexpr, AP: tl.constexpr):
    """(how many tokens chose routed expert e, each token's weight for it [TP], 0 if not chosen)."""
    offs_a = tl.arange(0, AP)
    ok = t_ok[:, None] & (offs_a < A)[None, :]
    ids = tl.load(idx_ptr + offs_t[:, None] * A + offs_a[None, :], mask=ok, other=-1)
    hit = (ids == e) & ok
    wts = tl.load(wt_ptr + offs_t[:, None] * A + offs_a[None, :], mask=ok & hit, other=0.0).to(tl.float32)
    return tl.sum(tl.sum(hit.to(tl.int32), 1), 0), tl.sum(wts, 1)


@triton.jit
def _few_gate_up(
    x_ptr, idx_ptr, wt_ptr, w_ptr, sw_ptr, h_ptr,  # x [T, d]; idx/wt [T, A]; gate_up [E, 2m, d]; shared [2ms, d]; h [T, S+E, m]
    T, d, m, ms, E,
    A: tl.constexpr, AP: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, TP: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)  # shared pieces first, then the routed experts
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_n = pid_n * BN + tl.arange(0, BN)
    used, _ = _used_by(idx_ptr, wt_ptr, offs_t, t_ok, slot - S, A, AP)  # 0 for the shared pieces
    if slot >= S and used == 0:  # an expert no token chose: nothing to compute
        return
    wg, up, n_ok = _gate_up_rows(w_ptr, sw_ptr, slot, offs_n, d, m, ms, S)
    g, u = _matmul_pair(x_ptr, offs_t, t_ok, wg, wg + up, n_ok, d, 0, d, TP, BN, BK, UPCAST, IEEE, "evict_first", False)
    hv = _act(g, ACT) * u
    out = h_ptr + (offs_t[:, None] * (S + E) + slot) * m + offs_n[None, :]
    tl.store(out, hv.to(h_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _few_down(
    h_ptr, idx_ptr, wt_ptr, w_ptr, sd_ptr, out_ptr,  # h [T, S+E, m]; down [E, d, m]; shared_down [d, ms]; out [T, K, d]
    T, d, m, ms, E, GS,
    A: tl.constexpr, AP: tl.constexpr, S: tl.constexpr, K: tl.constexpr, TP: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (block of d, group g): the sum over virtual experts g*GS.. g*GS+GS-1 (shared
    pieces with weight 1, routed experts with each token's weight, 0 if not chosen) into out[:, g]."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    acc = tl.zeros((TP, BN), tl.float32)
    for v in range(g * GS, tl.minimum(g * GS + GS, S + E)):
        used, coef = _used_by(idx_ptr, wt_ptr, offs_t, t_ok, v - S, A, AP)
        coef = tl.where(v < S, t_ok.to(tl.float32), coef)  # a shared piece: weight 1 for every token
        if v < S or used > 0:
            wd, k_end = _down_rows(w_ptr, sd_ptr, v, offs_n, d, m, ms, S)
            h_rows = h_ptr + (offs_t * (S + E) + v) * m
            part = _down_block(tl.zeros((TP, BN), tl.float32), h_rows, t_ok, wd, n_ok, m, k_end, BK, UPCAST, IEEE, "evict_first")
            acc += part * coef[:, None]
    out = out_ptr + (offs_t[:, None] * K + g) * d + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


FEW_MAX_TOKENS = 16  # up to this many tokens (and more than GEMV_MAX_PAIRS pairs): the few-token path (H200 sweep)
FEW_CONFIG = {"gate_up": (32, 256, 4, 3), "down": (32, 256, 4, 3)}  # (BN, BK, num_warps, num_stages)
FEW_DOWN_GROUPS = 4  # the down kernel splits the experts into this many groups, one output slot each (H200 sweep)


def _expert_groups(S: int, E: int, groups: int) -> tuple[int, int]:
    """(K, GS): a down kernel's output slots and virtual experts per slot, for the S + E virtual
    experts split into at most ``groups`` groups (few-token and masked paths)."""
    gs = triton.cdiv(S + E, min(groups, S + E))
    return triton.cdiv(S + E, gs), gs


def _few_experts(x, idx, weight, gate_up, down, act: str, cfg: dict | None = None, shared=None) -> torch.Tensor:
    """[T, K, d]: K partial sums over groups of experts (``FEW_DOWN_GROUPS``), to be summed by the caller."""
    cfg = cfg or FEW_CONFIG
    T, a = idx.shape
    d = x.shape[1]
    E, m = down.shape[0], down.shape[2]
    ms, S, sgu, sd = _shared_pieces(shared, gate_up, down)
    h = torch.empty(T, S + E, m, device=x.device, dtype=x.dtype)
    K, gs = _expert_groups(S, E, cfg.get("groups", FEW_DOWN_GROUPS))
    out = torch.empty(T, K, d, device=x.device, dtype=x.dtype)
    tp = max(16, triton.next_power_of_2(T))
    ap = triton.next_power_of_2(a)
    upcast = _INTERPRET and x.dtype != torch.float32
    ieee = x.dtype == torch.float32
    bn, bk, nw, ns = cfg["gate_up"]
    _few_gate_up[(triton.cdiv(m, bn), S + E)](
        x, idx, weight, gate_up, sgu, h, T, d, m, ms, E,
        A=a, AP=ap, S=S, ACT=_ACT_CODE[act], TP=tp, BN=bn, BK=bk, UPCAST=upcast, IEEE=ieee, num_warps=nw, num_stages=ns,
    )
    bn, bk, nw, ns = cfg["down"]
    _few_down[(triton.cdiv(d, bn), K)](
        h, idx, weight, down, sd, out, T, d, m, ms, E, gs,
        A=a, AP=ap, S=S, K=K, TP=tp, BN=bn, BK=bk, UPCAST=upcast, IEEE=ieee, num_warps=nw, num_stages=ns,
    )
    return out


# ----------------------------------------------------------------------------- alignment
@triton.jit
def _pair_experts(idx_ptr, p, ok, A: tl.constexpr, S: tl.constexpr):
    """Virtual expert of each pair p (slot p % (S + A) of token p // (S + A)): slots 0..S-1 are the
    shared pieces 0..S-1, slot S + k the routed expert idx[t, k] + S."""
    slot = p % (S + A)
    routed = tl.load(idx_ptr + (p // (S + A)) * A + slot - S, mask=ok & (slot >= S), other=0)
    return tl.where(slot < S, slot, routed + S).to(tl.int32)


@triton.jit
def _chunk_hits(idx_ptr, c, P, A: tl.constexpr, S: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr):
    """The pairs p of chunk c (pairs c * CHUNK ...), which of them exist, and each one's virtual
    expert one-hot [CHUNK, EB] (int32; rows of missing pairs all 0)."""
    p = c * CHUNK + tl.arange(0, CHUNK)
    ok = p < P
    hit = (_pair_experts(idx_ptr, p, ok, A, S)[:, None] == tl.arange(0, EB)[None, :]) & ok[:, None]
    return p, ok, hit.to(tl.int32)


@triton.jit
def _align_count_kernel(idx_ptr, counts_ptr, P, A: tl.constexpr, S: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr):
    """counts[c, e]: the pairs of chunk c that go to virtual expert e."""
    c = tl.program_id(0)
    _, _, hit = _chunk_hits(idx_ptr, c, P, A, S, CHUNK, EB)
    tl.store(counts_ptr + c * EB + tl.arange(0, EB), tl.sum(hit, 0))


@triton.jit
def _chunk_ranks(idx_ptr, counts_ptr, c, P, NCH, A: tl.constexpr, S: tl.constexpr, CHUNK: tl.constexpr,
                 EB: tl.constexpr, CB: tl.constexpr, ONE: tl.constexpr):
    """For chunk c: its pairs p (and which exist), each one's rank among the pairs of its virtual
    expert in pair order (so a placement by rank is stable), its one-hot expert [CHUNK, EB], and
    the pairs of every expert over all chunks. ONE: a single chunk holds every pair (counts not
    read)."""
    p, ok, hit = _chunk_hits(idx_ptr, c, P, A, S, CHUNK, EB)
    before = tl.zeros((EB,), tl.int32)  # the pairs of each expert in the chunks before c
    if ONE:
        counts = tl.sum(hit, 0)
    else:
        counts = tl.zeros((EB,), tl.int32)
        offs_e = tl.arange(0, EB)
        for c0 in range(0, NCH, CB):  # the counts of every chunk, CB chunks per load
            ch = c0 + tl.arange(0, CB)
            per_chunk = tl.load(counts_ptr + ch[:, None] * EB + offs_e[None, :], mask=ch[:, None] < NCH, other=0)
            counts += tl.sum(per_chunk, 0)
            before += tl.sum(tl.where(ch[:, None] < c, per_chunk, 0), 0)
    rank = tl.sum(hit * (tl.cumsum(hit, 0) - 1 + before[None, :]), 1)
    return p, ok, rank, hit, counts


@triton.jit
def _align_place_kernel(
    idx_ptr, counts_ptr, sorted_ptr, tile_expert_ptr,  # idx [T, A]; counts [NCH, EB]; sorted [max_tiles * BT]; tile_expert [max_tiles]
    P, NE, NCH, max_tiles,
    A: tl.constexpr, S: tl.constexpr, BT: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr, CB: tl.constexpr,
    TB: tl.constexpr, ONE: tl.constexpr,
):
    """Program c places the pairs of chunk c: row = first row of its expert's tiles + its rank
    among that expert's pairs. Program 0 also writes the padding rows (the sentinel P) and
    tile_expert (-1 past the last tile)."""
    c = tl.program_id(0)
    p, ok, rank, hit, counts = _chunk_ranks(idx_ptr, counts_ptr, c, P, NCH, A, S, CHUNK, EB, CB, ONE)
    ntiles = (counts + BT - 1) // BT
    tile_end = tl.cumsum(ntiles, 0)
    first = (tile_end - ntiles) * BT  # first row of each expert's tiles
    tl.store(sorted_ptr + rank + tl.sum(hit * first[None, :], 1), p, mask=ok)
    if c == 0:
        pad = tl.arange(0, BT)  # the padding rows of each expert's last tile
        tl.store(sorted_ptr + (first + counts)[:, None] + pad[None, :], P + tl.zeros((EB, BT), tl.int32),
                 mask=pad[None, :] < (ntiles * BT - counts)[:, None])
        for t0 in range(0, max_tiles, TB):
            tt = t0 + tl.arange(0, TB)
            e = tl.sum((tile_end[None, :] <= tt[:, None]).to(tl.int32), 1)  # experts whose tiles end before tt
            tl.store(tile_expert_ptr + tt, tl.where(e < NE, e, -1), mask=tt < max_tiles)


@triton.jit
def _sort_place_kernel(
    idx_ptr, counts_ptr, tok_ptr, pos_ptr, ends_ptr,  # idx [T, A]; counts [NCH, EB]; tok, pos [P]; ends [E]
    P, E, NCH,
    A: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr, CB: tl.constexpr, ONE: tl.constexpr,
):
    """Program c places the pairs of chunk c without padding: row = the pairs of the experts before
    its own + its rank; tok[row] = the pair's token, pos[pair] = row. Program 0 also writes each
    expert's end row (ends)."""
    c = tl.program_id(0)
    p, ok, rank, hit, counts = _chunk_ranks(idx_ptr, counts_ptr, c, P, NCH, A, 0, CHUNK, EB, CB, ONE)
    ends = tl.cumsum(counts, 0)
    row = rank + tl.sum(hit * (ends - counts)[None, :], 1)
    tl.store(tok_ptr + row, p // A, mask=ok)
    tl.store(pos_ptr + p, row, mask=ok)
    if c == 0:
        offs_e = tl.arange(0, EB)
        tl.store(ends_ptr + offs_e, ends, mask=offs_e < E)


def _chunks(P: int, NE: int) -> tuple[int, int, int, int]:
    """(eb, chunk, nch, cb) of the counting and placing kernels for P pairs over NE experts."""
    eb = max(16, triton.next_power_of_2(NE))
    chunk = max(16, min(ALIGN_CHUNK, triton.next_power_of_2(P), 8192 // eb))
    nch = max(1, triton.cdiv(P, chunk))  # one program per chunk (at least one: it writes the per-expert outputs)
    return eb, chunk, nch, max(2, min(triton.next_power_of_2(nch), ALIGN_COUNT_BLOCK // eb))


def _chunk_counts(idx: torch.Tensor, P: int, eb: int, chunk: int, nch: int, shared: int = 0) -> torch.Tensor:
    """counts [nch, eb]: the pairs of each chunk per virtual expert. With one chunk, a placeholder
    that the placing kernels do not read (they count by themselves)."""
    if nch == 1:
        return idx.new_empty(0, dtype=torch.int32)
    counts = torch.empty(nch, eb, device=idx.device, dtype=torch.int32)
    _align_count_kernel[(nch,)](idx, counts, P, A=idx.shape[1], S=shared, CHUNK=chunk, EB=eb, num_warps=4)
    return counts


def sort_pairs(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The P = T*a (token, slot) pairs of ``idx [T, a]`` sorted by expert, stably, without
    padding: ``tokens [P] int32`` (the token of each row's pair), ``ends [E] int32`` (each expert's
    end row) and ``pos [P] int64`` (the row of each pair; int64, so that torch indexes with it as it
    is). The counting and placing kernels while their counts fit ALIGN_KERNEL_MAX_COUNTS, else
    torch ops. Static shapes, no host sync."""
    T, a = idx.shape
    P = T * a
    eb, chunk, nch, cb = _chunks(P, num_experts)
    if nch * eb > ALIGN_KERNEL_MAX_COUNTS:
        order, ends = expert_order(idx, num_experts)
        pos = torch.empty(P, device=idx.device, dtype=torch.int64).scatter_(0, order, torch.arange(P, device=idx.device))
        return (order // a).to(torch.int32), ends, pos
    idx = idx.contiguous()
    tokens = torch.empty(P, device=idx.device, dtype=torch.int32)
    pos = torch.empty(P, device=idx.device, dtype=torch.int64)
    ends = torch.empty(num_experts, device=idx.device, dtype=torch.int32)
    _sort_place_kernel[(nch,)](idx, _chunk_counts(idx, P, eb, chunk, nch), tokens, pos, ends, P, num_experts, nch,
                               A=a, CHUNK=chunk, EB=eb, CB=cb, ONE=nch == 1, num_warps=4)
    return tokens, ends, pos


def align(idx: torch.Tensor, num_experts: int, bt: int, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, slot) pairs grouped by expert and padded to tiles of ``bt`` rows.

    With ``shared`` = S > 0 every token also has S shared pieces: pair p is slot p % (S + a) of
    token p // (S + a), slots 0..S-1 go to virtual experts 0..S-1 and slot S + k to
    ``idx[t, k] + S`` (the routed experts are numbered after the pieces).

    Returns ``sorted_ids [max_tiles * bt] int32`` (pair index, or P for padding) and
    ``tile_expert [max_tiles] int32`` (virtual expert, -1 for unused tiles);
    ``max_tiles = ceil(P / bt) + S + E`` bounds the tiles any routing can need, so shapes do not
    depend on the routing.
    """
    T, a = idx.shape
    NE, P = shared + num_experts, T * (shared + a)
    max_tiles = triton.cdiv(P, bt) + NE
    eb, chunk, nch, cb = _chunks(P, NE)
    if nch * eb <= ALIGN_KERNEL_MAX_COUNTS:
        sorted_ids = torch.empty(max_tiles * bt, device=idx.device, dtype=torch.int32)
        tile_expert = torch.empty(max_tiles, device=idx.device, dtype=torch.int32)
        counts = _chunk_counts(idx, P, eb, chunk, nch, shared)
        _align_place_kernel[(nch,)](idx, counts, sorted_ids, tile_expert, P, NE, nch, max_tiles, A=a, S=shared, BT=bt,
                                    CHUNK=chunk, EB=eb, CB=cb, ONE=nch == 1,
                                    TB=max(16, min(triton.next_power_of_2(max_tiles), 8192 // eb)), num_warps=4)
        return sorted_ids, tile_expert
    # many pairs: parallel torch ops, still static shapes and no host sync
    flat = idx + shared
    if shared:
        flat = torch.cat([torch.arange(shared, device=idx.device, dtype=idx.dtype).expand(T, shared), flat], dim=1)
    flat = flat.reshape(-1)
    counts = expert_counts(flat, NE)
    ntiles = (counts + bt - 1) // bt
    tile_end = ntiles.cumsum(0)  # [NE]
    order = sort_by_expert(flat, NE)  # [P]
    se = flat[order]
    rank = torch.arange(P, device=idx.device) - (counts.cumsum(0) - counts)[se]
    dest = (tile_end - ntiles)[se] * bt + rank
    sorted_ids = torch.full((max_tiles * bt,), P, device=idx.device, dtype=torch.int32)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    tiles = torch.arange(max_tiles, device=idx.device)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True)
    tile_expert = torch.where(tile_expert < NE, tile_expert, -1).to(torch.int32)
    return sorted_ids, tile_expert


# ----------------------------------------------------------------------------- grouped GEMM path
@triton.jit
def _tile_of(pid, num_tiles, n_blocks, GROUP: tl.constexpr):
    """(tile of rows, block of columns) of program pid, in grouped order: GROUP row tiles sweep
    the column blocks together, so that their weights are reused from L2."""
    in_group = GROUP * n_blocks
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_tiles - first, GROUP)
    return first + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _grouped_gate_up(
    x_ptr, w_ptr, sw_ptr, h_ptr, sorted_ptr, tile_expert_ptr,  # x [T, d]; gate_up [E, 2m, d]; shared_gate_up [2ms, d]; h [max_tiles*BT, m]
    P, d, m, ms, num_tiles,
    A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, PAIRED: tl.constexpr, EVEN_K: tl.constexpr,
):
    tile, pid_n = _tile_of(tl.program_id(0), num_tiles, tl.cdiv(m, BN), GROUP)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    e = e.to(tl.int64)
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    tok = (pair // (S + A)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    wg, up, n_ok = _gate_up_rows(w_ptr, sw_ptr, e, offs_n, d, m, ms, S)
    if PAIRED:
        j = tl.arange(0, 2 * BN)
        w2, up2, ok2 = _gate_up_rows(w_ptr, sw_ptr, e, pid_n * BN + j // 2, d, m, ms, S)
        g, u = _matmul_paired(x_ptr, tok, valid, w2 + (j % 2) * up2, ok2, d, BT, BN, BK, UPCAST, IEEE, EVEN_K)
    else:
        g, u = _matmul_pair(x_ptr, tok, valid, wg, wg + up, n_ok, d, 0, d, BT, BN, BK, UPCAST, IEEE, "", False)
    hv = _act(g, ACT) * u
    tl.store(h_ptr + rows[:, None].to(tl.int64) * m + offs_n[None, :], hv.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _grouped_down(
    h_ptr, w_ptr, sd_ptr, wt_ptr, y_ptr, sorted_ptr, tile_expert_ptr,  # h [max_tiles*BT, m]; down [E, d, m]; shared_down [d, ms]; wt [T, A]; y [T, y_slots, d]
    P, d, m, ms, num_tiles, y_slots, y_first,
    A: tl.constexpr, S: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    tile, pid_n = _tile_of(tl.program_id(0), num_tiles, tl.cdiv(d, BN), GROUP)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    e = e.to(tl.int64)
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    wd, k_end = _down_rows(w_ptr, sd_ptr, e, offs_n, d, m, ms, S)
    h_rows = h_ptr + rows.to(tl.int64) * m
    acc = _down_block(tl.zeros((BT, BN), tl.float32), h_rows, valid, wd, n_ok, m, k_end, BK, UPCAST, IEEE, "")
    slot = pair % (S + A)  # the shared pieces have weight 1, routed slot S + k the weight wt[t, k]
    rw = tl.load(wt_ptr + (pair // (S + A)) * A + slot - S, mask=valid & (slot >= S), other=1.0).to(tl.float32)
    acc = acc * rw[:, None]
    y_row = (pair // (S + A) * y_slots + y_first + slot).to(tl.int64)  # token t's slot: row t * y_slots + y_first + slot
    tl.store(y_ptr + y_row[:, None] * d + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


# tile shapes of the grouped path, by number of (token, slot) pairs, shared pieces included: BT rows per tile, then
# (BN, BK, num_warps, num_stages) of gate_up and of down (H200 sweep, benchmarks/bench_experts.py); ``paired``: the
# gate/up kernel's one product over interleaved gate and up rows (``_matmul_paired``; H200, run am: at 2048-16384
# pairs the gate/up kernel 1-5 % faster alone; in the 1x2048 forward llama3-8b 0.4-0.7 % faster, llama2-7b within
# the rounds' spread)
GROUPED_CONFIGS = [
    (512, dict(bt=64, gate_up=(64, 64, 4, 4), down=(128, 64, 4, 4))),  # decode
    (1024, dict(bt=128, gate_up=(64, 64, 8, 3), down=(128, 64, 8, 3))),
    (None, dict(bt=128, gate_up=(128, 64, 8, 4), down=(256, 64, 8, 4), paired=True)),  # prefill
]


def grouped_config(pairs: int) -> dict:
    for limit, cfg in GROUPED_CONFIGS:
        if limit is None or pairs <= limit:
            return cfg
    raise AssertionError


def _grouped_experts(x, idx, weight, gate_up, down, act: str, cfg: dict | None = None, shared=None,
                     y: torch.Tensor | None = None, y_first: int = 0) -> torch.Tensor:
    """[T, S + a, d]: each (token, slot) pair's weighted expert output, to be summed over the
    slots. ``shared``: None or (shared_gate_up [2ms, d], shared_down [d, ms]); its pieces become
    S extra experts that every token selects with weight 1, in slots 0..S-1. ``y`` [T, K, d]: the
    slots written to y[:, y_first:y_first + S + a] instead (the others left as they are); returns y."""
    T, a = idx.shape
    d = x.shape[1]
    E, m = down.shape[0], down.shape[2]
    ms, S, sgu, sd = _shared_pieces(shared, gate_up, down)
    P = T * (S + a)
    cfg = cfg or grouped_config(P)
    bt = cfg["bt"]
    sorted_ids, tile_expert = align(idx, E, bt, S)
    num_tiles = tile_expert.numel()
    h = torch.empty(num_tiles * bt, m, device=x.device, dtype=x.dtype)
    upcast = _INTERPRET and x.dtype != torch.float32
    ieee = x.dtype == torch.float32
    code = _ACT_CODE[act]
    bn, bk, nw, ns = cfg["gate_up"]
    gm = cfg.get("group", 8)
    grid = (num_tiles * triton.cdiv(m, bn),)
    _grouped_gate_up[grid](
        x, gate_up, sgu, h, sorted_ids, tile_expert, P, d, m, ms, num_tiles,
        A=a, S=S, ACT=code, BT=bt, BN=bn, BK=bk, GROUP=gm, UPCAST=upcast, IEEE=ieee,
        PAIRED=cfg.get("paired", False), EVEN_K=d % bk == 0, num_warps=nw, num_stages=ns,
    )
    if y is None:
        y = torch.empty(T, S + a, d, device=x.device, dtype=x.dtype)
    bn, bk, nw, ns = cfg["down"]
    grid = (num_tiles * triton.cdiv(d, bn),)
    _grouped_down[grid](
        h, down, sd, weight, y, sorted_ids, tile_expert, P, d, m, ms, num_tiles, y.shape[1], y_first,
        A=a, S=S, BT=bt, BN=bn, BK=bk, GROUP=gm, UPCAST=upcast, IEEE=ieee, num_warps=nw, num_stages=ns,
    )
    return y  # the output of each slot: the caller sums them


# ----------------------------------------------------------------------------- grouped_mm path (prefill)
# Many tokens in bf16 on a GPU with torch's grouped GEMM (CUTLASS on Hopper): the pairs sorted by
# expert (``sort_pairs``: the alignment's counting kernel and a placing kernel without padding),
# x's rows gathered into that order, ``torch._grouped_mm`` for gate/up, the activation,
# ``torch._grouped_mm`` for down, then each token's rows summed with its routing weights (and the
# shared expert's output, computed by cuBLAS) in one pass. Only the glue is ours.
GROUPED_MM_MIN_ROWS = 640  # from this many (token, expert) pairs per routed expert, on average (H200 sweep)


def grouped_mm_ok(x: torch.Tensor, d: int, m: int) -> bool:
    """Whether ``torch._grouped_mm`` serves these experts: bf16, 16-byte aligned rows, and on a GPU
    a Hopper or newer one (its CUTLASS kernels), or the CPU (in the interpreter, for the tests)."""
    if x.dtype != torch.bfloat16 or d % 8 or m % 8 or not hasattr(torch, "_grouped_mm"):
        return False
    return x.device.type == "cpu" or torch.cuda.get_device_capability(x.device) >= (9, 0)


@triton.jit
def _glu_rows(gu_ptr, h_ptr, idx_ptr, wt_ptr, m, E, A: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr):
    """h[r] = w * act(g) * u with [g; u] = gu[r] (one row of [R, 2m], gate columns first). Without
    routing (A = 0) w = 1; with it, row r is token t = r // E's row for expert e = r % E, and w is
    t's routing weight for e (``idx``, ``wt`` [T, A]), 0 if t did not choose e."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    ok = cols < m
    g = tl.load(gu_ptr + r * 2 * m + cols, mask=ok).to(tl.float32)
    u = tl.load(gu_ptr + r * 2 * m + m + cols, mask=ok).to(tl.float32)
    h = _act(g, ACT) * u
    if A > 0:
        t = r // E
        e = r % E
        w = 0.0
        for k in tl.static_range(A):
            w += tl.where(tl.load(idx_ptr + t * A + k) == e, tl.load(wt_ptr + t * A + k), 0.0)
        h = h * w
    tl.store(h_ptr + r * m + cols, h.to(h_ptr.dtype.element_ty), mask=ok)


def glu(gu: torch.Tensor, act: str, routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """act(g) * u for the rows [g; u] of ``gu [R, 2m]``, in one pass. With ``routing`` (idx,
    weight [T, a]) the rows are every token's row for every expert (R = T * E, token-major) and
    each is scaled by the token's routing weight for that expert (0 where it did not choose it)."""
    R, m = gu.shape[0], gu.shape[1] // 2
    h = torch.empty(R, m, device=gu.device, dtype=gu.dtype)
    if routing is None:
        idx, wt, a, E = gu, gu, 0, 1  # idx and wt: placeholders, not read
    else:
        idx, wt = routing
        a, E = idx.shape[1], R // max(idx.shape[0], 1)
    if R:
        _glu_rows[(R, triton.cdiv(m, 1024))](gu, h, idx, wt, m, E, A=a, ACT=_ACT_CODE[act], BM=1024)
    return h


def dense_expert(x, gate_up, down, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``cmoe.experts.shared_expert`` with cuBLAS for the GEMMs and one kernel for the activation;
    ``out``: a [T, d] tensor (a view with strided rows too) to write the result into."""
    h = glu(x @ gate_up.T, act)
    return h @ down.T if out is None else torch.mm(h, down.T, out=out)


@triton.jit
def _sum_rows(y_ptr, pos_ptr, wt_ptr, extra_ptr, out_ptr, d, t_step, k_step,
              A: tl.constexpr, POS: tl.constexpr, WEIGHT: tl.constexpr, EXTRA: tl.constexpr, BD: tl.constexpr):
    """out[t] = extra[t] + sum_k wt[t, k] * y[pos[t, k]], in float32, rounded once. Without POS the
    rows are t * t_step + k * k_step, without WEIGHT the weights 1, without EXTRA no extra."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = cols < d
    acc = tl.zeros((BD,), tl.float32)
    if EXTRA:
        acc += tl.load(extra_ptr + t * d + cols, mask=ok).to(tl.float32)
    for k in tl.static_range(A):
        r = t * t_step + k * k_step
        if POS:
            r = tl.load(pos_ptr + r).to(tl.int64)
        yk = tl.load(y_ptr + r * d + cols, mask=ok).to(tl.float32)
        if WEIGHT:
            yk *= tl.load(wt_ptr + t * A + k)
        acc += yk
    tl.store(out_ptr + t * d + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_rows(y: torch.Tensor, a: int, pos=None, weight=None, extra=None, by_slot: bool = False) -> torch.Tensor:
    """[T, d]: out[t] = extra[t] + sum_k weight[t, k] * y[pos[t, k]] for y [R, d]; pos None: row
    t * a + k (``by_slot``: row k * T + t, y [a, T, d]); weight None: 1; extra None: 0."""
    d = y.shape[1]
    T = pos.numel() // a if pos is not None else y.shape[0] // a
    out = torch.empty(T, d, device=y.device, dtype=y.dtype)
    if T:
        t_step, k_step = (1, T) if by_slot else (a, 1)
        _sum_rows[(T, triton.cdiv(d, 1024))](
            y, pos if pos is not None else y, weight if weight is not None else y, extra if extra is not None else y,
            out, d, t_step, k_step, A=a, POS=pos is not None, WEIGHT=weight is not None, EXTRA=extra is not None, BD=1024,
        )
    return out


def _grouped_mm_rows(x, idx, gate_up, down, act: str, extra=None, beside=None) -> tuple:
    """(rows [P, d]: each (token, slot) pair's expert output, unweighted, in the experts' order,
    through two ``torch._grouped_mm`` calls; pos [P]: each pair's row; ``extra``). With ``beside``
    (a ``_Beside`` whose side stream makes ``extra``, the shared expert's output), the current
    stream waits for it only after the GEMMs are enqueued. Static shapes, no host sync."""
    tokens, ends, pos = sort_pairs(idx, gate_up.shape[0])
    rows = grouped_pairs(x, tokens, ends, gate_up, down, lambda gu: glu(gu, act))
    return rows, pos, beside.wait(extra) if beside is not None else extra


def _grouped_mm_experts(x, idx, weight, gate_up, down, act: str, extra=None, beside=None) -> torch.Tensor:
    """[T, d]: the routed experts through ``torch._grouped_mm`` (``_grouped_mm_rows``), each
    token's rows weighted and summed, plus ``extra`` [T, d] if given, in one pass (``sum_rows``)."""
    rows, pos, extra = _grouped_mm_rows(x, idx, gate_up, down, act, extra, beside)
    return sum_rows(rows, idx.shape[1], pos, weight, extra)


SHARED_STREAM = True  # prefill and the dense path: the shared expert on a second CUDA stream, beside the routed path (H200)
_SIDE_STREAMS: dict = {}


class _Beside:
    """A second CUDA stream of x's device for work that runs beside what the current stream does
    next: ``with torch.cuda.stream(b.side): ...`` enqueues it there (after the current stream's
    work so far); ``b.wait(t)`` makes the current stream wait for it before using its result t.
    Without CUDA, or with ``on`` False, ``side`` is None and everything runs in order."""

    def __init__(self, x: torch.Tensor, on: bool = True):
        self.side = None
        if on and x.is_cuda:
            self.main = torch.cuda.current_stream(x.device)
            self.side = _SIDE_STREAMS.get(x.device) or _SIDE_STREAMS.setdefault(x.device, torch.cuda.Stream(x.device))
            self.side.wait_stream(self.main)

    def wait(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if self.side is not None and t is not None:
            self.main.wait_stream(self.side)
            t.record_stream(self.main)  # made on the side stream, used and freed on the current one
        return t

    def mark(self):
        """An event at this point of the side stream's work (None without a side stream)."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait_mark(self, event, *ts: torch.Tensor) -> None:
        """Make the current stream wait for the side stream's work up to ``mark()``'s ``event``;
        ``ts``: tensors made there before it, used on the current stream from now on."""
        if event is not None:
            self.main.wait_event(event)
            for t in ts:
                t.record_stream(self.main)


def _shared_beside(x, shared, act: str, out: torch.Tensor | None = None) -> tuple[_Beside, torch.Tensor | None]:
    """The shared expert (``shared``: (gate_up, down), or None for none) run by cuBLAS on a second
    stream (``SHARED_STREAM``), beside what the current stream enqueues next: (the ``_Beside`` whose
    ``wait`` joins it, its output [T, d] or None); ``out``: where to write that output."""
    beside = _Beside(x, on=SHARED_STREAM and shared is not None)
    with torch.cuda.stream(beside.side):
        extra = dense_expert(x, *shared, act, out=out) if shared is not None else None
    return beside, extra


# ----------------------------------------------------------------------------- fused router
@triton.jit
def _route_scores(x_ptr, g_ptr, u_ptr, rows, r_ok, offs_e, e_ok, d, k_start, k_stop,
                  BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  LINEAR: tl.constexpr):
    """<x, g_j> and <x, u_j> over columns [k_start, k_stop) of d: two [BT, BE] float32 blocks
    (LINEAR: the linear router's <x, W_j> in the first; u is not read)."""
    return _matmul_pair(x_ptr, rows.to(tl.int64), r_ok, g_ptr + offs_e * d, u_ptr + offs_e * d, e_ok, d, k_start, k_stop,
                        BT, BE, BK, UPCAST, IEEE, "", LINEAR)


@triton.jit
def _route_probs(g, u, e_ok, ACT: tl.constexpr, LINEAR: tl.constexpr):
    """scores |u * act(g)| (LINEAR: g) -> p = softmax over the E experts [BT, BE]."""
    if LINEAR:
        s = g
    else:
        s = tl.abs(u * _act(g, ACT))
    s = tl.where(e_ok[None, :], s, float("-inf"))
    s = tl.exp(s - tl.max(s, 1)[:, None])
    return s / tl.sum(s, 1)[:, None]


@triton.jit
def _take_best(sel, offs_e, BE: tl.constexpr):
    """The best expert of each row of ``sel`` [BT, BE] (first index on ties), and its one-hot mask."""
    best = tl.max(sel, 1)
    j = tl.min(tl.where(sel == best[:, None], offs_e[None, :], BE), 1)
    return j, offs_e[None, :] == j[:, None]


@triton.jit
def _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E,
                  A: tl.constexpr, ACT: tl.constexpr, BE: tl.constexpr, LINEAR: tl.constexpr):
    """scores -> p = softmax, top-A of p + b (first index on ties), weights 1 + p * v: stored."""
    p = _route_probs(g, u, e_ok, ACT, LINEAR)  # [BT, BE]
    tl.store(p_ptr + rows[:, None] * E + offs_e[None, :], p, mask=r_ok[:, None] & e_ok[None, :])
    b = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    sel = tl.where(e_ok[None, :], p + b[None, :], float("-inf"))
    for k in tl.static_range(A):
        j, hit = _take_best(sel, offs_e, BE)
        pj = tl.sum(tl.where(hit, p, 0.0), 1)
        vj = tl.load(scale_ptr + j, mask=r_ok & (j < E), other=0.0).to(tl.float32)
        tl.store(idx_ptr + rows * A + k, j.to(tl.int64), mask=r_ok)
        tl.store(wt_ptr + rows * A + k, 1.0 + pj * vj, mask=r_ok)
        sel = tl.where(hit, float("-inf"), sel)


@triton.jit
def _route_weights(g, u, offs_e, e_ok, bias_ptr, scale_ptr,
                   A: tl.constexpr, ACT: tl.constexpr, BE: tl.constexpr, LINEAR: tl.constexpr):
    """scores -> (each token's weight for each routed expert [BT, BE]: 1 + p v for its top-A, 0
    for the others; which experts it chose): the same choice and weights as _route_finish."""
    p = _route_probs(g, u, e_ok, ACT, LINEAR)
    b = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    sel = tl.where(e_ok[None, :], p + b[None, :], float("-inf"))
    taken = tl.zeros_like(p)
    for k in tl.static_range(A):
        j, hit = _take_best(sel, offs_e, BE)
        taken += hit.to(tl.float32)
        sel = tl.where(hit, float("-inf"), sel)
    v = tl.load(scale_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    chosen = taken > 0
    return tl.where(chosen, 1.0 + p * v[None, :], 0.0), chosen


@triton.jit
def _route_kernel(
    x_ptr, g_ptr, u_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr,  # x [T, d]; g, u [E, d]; idx, wt [T, A]; p [T, E]
    T, d, E,
    A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, LINEAR: tl.constexpr,
):
    """Many tokens: the router in one pass per tile of BT tokens."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g, u = _route_scores(x_ptr, g_ptr, u_ptr, rows, r_ok, offs_e, e_ok, d, 0, d, BT, BE, BK, UPCAST, IEEE, LINEAR)
    _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E, A, ACT, BE, LINEAR)


@triton.jit
def _route_partial(x_ptr, g_ptr, u_ptr, part_ptr, tile, split, T, d, rows_pad, E, KPER,
                   BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   LINEAR: tl.constexpr):
    """The partial scores of token tile ``tile`` over slice ``split`` of d, stored in part."""
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g, u = _route_scores(x_ptr, g_ptr, u_ptr, rows, r_ok, offs_e, e_ok, d, split * KPER, split * KPER + KPER, BT, BE, BK, UPCAST, IEEE, LINEAR)
    out = part_ptr + split * 2 * rows_pad * BE + rows[:, None] * BE + offs_e[None, :]
    tl.store(out, g)
    tl.store(out + rows_pad * BE, u)


@triton.jit
def _route_reduce(part_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, tile, T, rows_pad, E, SPLITS,
                  A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, LINEAR: tl.constexpr):
    """Token tile ``tile``: sum the partial scores of every slice (fixed order: deterministic; read
    from L2, as other programs of the same launch may have written them), then finish."""
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g = tl.zeros((BT, BE), tl.float32)
    u = tl.zeros((BT, BE), tl.float32)
    ptr = part_ptr + rows[:, None] * BE + offs_e[None, :]
    for sp in range(SPLITS):
        g += tl.load(ptr + sp * 2 * rows_pad * BE, cache_modifier=".cg")
        if not LINEAR:
            u += tl.load(ptr + sp * 2 * rows_pad * BE + rows_pad * BE, cache_modifier=".cg")
    _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E, A, ACT, BE, LINEAR)


@triton.jit
def _route_partial_kernel(
    x_ptr, g_ptr, u_ptr, part_ptr,  # part [SPLITS, 2, rows_pad, BE] float32
    T, d, rows_pad, E, KPER,
    BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    LINEAR: tl.constexpr,
):
    """Few tokens: partial scores over one slice of d (programs: token tiles x slices of d)."""
    _route_partial(x_ptr, g_ptr, u_ptr, part_ptr, tl.program_id(0), tl.program_id(1), T, d, rows_pad, E, KPER,
                   BT, BE, BK, UPCAST, IEEE, LINEAR)


@triton.jit
def _route_reduce_kernel(
    part_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr,
    T, rows_pad, E, SPLITS,
    A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, LINEAR: tl.constexpr,
):
    """Few tokens: sum the partial scores of every slice, then finish (``_route_reduce``)."""
    _route_reduce(part_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, tl.program_id(0), T, rows_pad, E, SPLITS,
                  A, ACT, BT, BE, LINEAR)


ROUTE_SPLIT_MAX_TOKENS = 4096  # up to this many tokens: scores split over slices of d (two kernels; fills the GPU)
ROUTE_SPLIT_K = 256  # columns of d per slice
ROUTE_TILE = 16  # tokens per program of the split router (the most the GEMV op takes)
# from ROUTE_WIDE_MIN_TOKENS tokens: fewer, larger programs (H200, 2,048 tokens, d = 4,096, alone:
# 7.6 us against 11.8 with the tiles above; docs/benchmarks/speed-h200-log.md, "Run ag")
ROUTE_WIDE_MIN_TOKENS = 1024
ROUTE_WIDE_TILE = 32
ROUTE_WIDE_SPLIT_K = 512


def _route_split(T: int) -> tuple[int, int]:
    """(tokens per program, columns of d per slice) of the split router for T tokens."""
    return (ROUTE_WIDE_TILE, ROUTE_WIDE_SPLIT_K) if T >= ROUTE_WIDE_MIN_TOKENS else (ROUTE_TILE, ROUTE_SPLIT_K)


@torch.library.custom_op("cmoe::triton_route", mutates_args=())
def triton_route_op(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, act: str, top_k: int,
    linear: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's (idx, weight, probs); ``linear``: scores = x @ gate^T (``up`` is not read),
    else the analytical scores |<u_j, x> act(<g_j, x>)|."""
    T, d = x.shape
    E = gate.shape[0]
    idx, wt, p, be, ieee, upcast = _route_outputs(x, gate, top_k)
    if T == 0:
        return idx, wt, p
    x, gate, up = x.contiguous(), gate.contiguous(), up.contiguous()
    code = _ACT_CODE[act]
    if T <= ROUTE_SPLIT_MAX_TOKENS:
        bt, split_k = _route_split(T)
        tiles = triton.cdiv(T, bt)
        bk, kper, splits = _route_slices(d, split_k)
        part = torch.empty(splits, 2, tiles * bt, be, device=x.device, dtype=torch.float32)
        _route_partial_kernel[(tiles, splits)](
            x, gate, up, part, T, d, tiles * bt, E, kper, BT=bt, BE=be, BK=bk, UPCAST=upcast, IEEE=ieee, LINEAR=linear,
            num_warps=4,
        )
        _route_reduce_kernel[(tiles,)](
            part, bias, scale, idx, wt, p, T, tiles * bt, E, splits, A=top_k, ACT=code, BT=bt, BE=be, LINEAR=linear,
            num_warps=4,
        )
        return idx, wt, p
    bt = 64
    _route_kernel[(triton.cdiv(T, bt),)](
        x, gate, up, bias, scale, idx, wt, p, T, d, E,
        A=top_k, ACT=code, BT=bt, BE=be, BK=64, UPCAST=upcast, IEEE=ieee, LINEAR=linear, num_warps=4,
    )
    return idx, wt, p


def _route_outputs(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple:
    """(idx [T, a] int64, weight [T, a] float32, probs [T, E] float32) to be written by the router's
    kernels, and their settings: (BE: the experts padded to a power of 2, at least 16; IEEE: exact
    float32 products; UPCAST: bf16 operands in float32 for the interpreter)."""
    T, E = x.shape[0], gate.shape[0]
    idx = torch.empty(T, top_k, device=x.device, dtype=torch.int64)
    wt = torch.empty(T, top_k, device=x.device, dtype=torch.float32)
    p = torch.empty(T, E, device=x.device, dtype=torch.float32)
    ieee = _router_ieee(x, gate)
    return idx, wt, p, max(16, triton.next_power_of_2(E)), ieee, _INTERPRET and not ieee


def _route_slices(d: int, split_k: int | None = None) -> tuple[int, int, int]:
    """(BK, columns per slice, slices) of the router's partial scores over slices of d, of
    ``split_k`` columns (default ROUTE_SPLIT_K) rounded up to a multiple of BK."""
    bk = 64 if _INTERPRET else 128
    kper = triton.cdiv(split_k or ROUTE_SPLIT_K, bk) * bk
    return bk, kper, triton.cdiv(d, kper)


@triton_route_op.register_fake
def _(x, gate, up, bias, scale, act, top_k, linear=False):
    T, E = x.shape[0], gate.shape[0]
    return (
        x.new_empty(T, top_k, dtype=torch.int64),
        x.new_empty(T, top_k, dtype=torch.float32),
        x.new_empty(T, E, dtype=torch.float32),
    )


def router_args(router) -> tuple:
    """(gate, up, bias, scale, linear): the router's tensors as the router kernels take them; a
    ``LinearRouter``'s weight is both gate and up (up is not read), an ``AnalyticalRouter`` has both."""
    if hasattr(router, "weight"):  # LinearRouter
        return router.weight, router.weight, router.bias, router.scale, True
    return router.gate, router.up, router.bias, router.scale, False


def _router_ieee(x: torch.Tensor, gate: torch.Tensor) -> bool:
    """The router's scores with exact float32 products: float32 inputs, or mixed dtypes."""
    return gate.dtype == torch.float32 or x.dtype == torch.float32 or gate.dtype != x.dtype


def fused_route(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``router(x)`` of an ``AnalyticalRouter`` or a ``LinearRouter`` in one kernel (two for few
    tokens): (idx [T, a], weight [T, a], probs [T, E])."""
    gate, up, bias, scale, linear = router_args(router)
    return triton_route_op(x, gate, up, bias, scale, activations.canonical(router.act), router.top_k, linear)


# ----------------------------------------------------------------------------- masked path: the whole layer
# Batches whose routing touches (nearly) every expert (decode at batch 8-256): no sort and no
# separate router. ``_masked_gate_up`` multiplies every token by every virtual expert's weights,
# each read once, and in one more program per tile of tokens computes the router's scores;
# ``_masked_down`` turns the scores into each token's top-a choice and weights (the same as the
# fused router's) and sums its group of virtual experts with weight 1 (shared pieces), the
# routing weight (chosen) or 0 (not chosen), skipping experts that no token of the tile chose.
# The whole FFN, router included, in two launches (the other paths need four or five).
@triton.jit
def _masked_gate_up(
    x_ptr, w_ptr, sw_ptr, rg_ptr, ru_ptr, h_ptr, sc_ptr,  # x [T, d]; gate_up [E, 2m, d]; shared [2ms, d]; router [E, d] x2; h [T, S+E, m]; scores [2, rows_pad, BE]
    T, d, m, ms, E, rows_pad,
    S: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, R_IEEE: tl.constexpr, LINEAR: tl.constexpr,
):
    tile = tl.program_id(0)  # fastest-varying: the token tiles that read the same weights run together
    pid_n = tl.program_id(1)
    v = tl.program_id(2)  # virtual expert (shared pieces, then routed experts); S + E: the router
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    if v == S + E:
        if pid_n == 0:  # one program per tile of tokens: the router's scores over all of d
            offs_e = tl.arange(0, BE)
            g, u = _route_scores(x_ptr, rg_ptr, ru_ptr, rows, r_ok, offs_e, offs_e < E, d, 0, d,
                                 BT, BE, BK, UPCAST, R_IEEE, LINEAR)
            out = sc_ptr + rows[:, None] * BE + offs_e[None, :]
            tl.store(out, g)
            tl.store(out + rows_pad * BE, u)
        return
    offs_n = pid_n * BN + tl.arange(0, BN)
    wg, up, n_ok = _gate_up_rows(w_ptr, sw_ptr, v, offs_n, d, m, ms, S)
    g, u = _matmul_pair(x_ptr, rows.to(tl.int64), r_ok, wg, wg + up, n_ok, d, 0, d, BT, BN, BK, UPCAST, IEEE,
                        "evict_first", False)
    out = h_ptr + (rows[:, None].to(tl.int64) * (S + E) + v) * m + offs_n[None, :]
    tl.store(out, (_act(g, ACT) * u).to(h_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _masked_down(
    h_ptr, sc_ptr, bias_ptr, scale_ptr, w_ptr, sd_ptr, out_ptr,  # h [T, S+E, m]; scores [2, rows_pad, BE]; down [E, d, m]; shared_down [d, ms]; out [T, K, d]
    T, d, m, ms, E, GS, rows_pad,
    A: tl.constexpr, S: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, BE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, LINEAR: tl.constexpr,
):
    """Program (tile of tokens, block of d, group g): the sum over virtual experts g*GS.. g*GS+GS-1 into out[:, g]."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    sc = sc_ptr + rows[:, None] * BE + offs_e[None, :]
    coef, chosen = _route_weights(tl.load(sc), tl.load(sc + rows_pad * BE), offs_e, offs_e < E, bias_ptr, scale_ptr,
                                  A, ACT, BE, LINEAR)  # [BT, BE]
    chosen = chosen & r_ok[:, None]
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    acc = tl.zeros((BT, BN), tl.float32)
    for v in range(grp * GS, tl.minimum(grp * GS + GS, S + E)):
        col = offs_e[None, :] == v - S  # the routed expert's column (none for a shared piece)
        used = tl.sum(tl.sum((col & chosen).to(tl.int32), 1), 0)
        c = tl.where(v < S, r_ok.to(tl.float32), tl.sum(tl.where(col, coef, 0.0), 1))  # [BT]
        if v < S or used > 0:
            wd, k_end = _down_rows(w_ptr, sd_ptr, v, offs_n, d, m, ms, S)
            h_rows = h_ptr + (rows.to(tl.int64) * (S + E) + v) * m
            part = _down_block(tl.zeros((BT, BN), tl.float32), h_rows, r_ok, wd, n_ok, m, k_end, BK, UPCAST, IEEE,
                               "evict_first")
            acc += part * c[:, None]
    out = out_ptr + (rows[:, None].to(tl.int64) * K + grp) * d + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


# by number of tokens: BT tokens per tile, (BN, BK, num_warps, num_stages) of gate_up and of down,
# groups of virtual experts in the down kernel (one output slot each); H200 sweep
# (``bench_experts.py --masked``, docs/benchmarks/speed-h200-log.md)
MASKED_CONFIGS = [
    (16, dict(bt=16, gate_up=(32, 128, 4, 3), down=(64, 128, 4, 3), groups=4)),
    (32, dict(bt=32, gate_up=(64, 128, 4, 3), down=(64, 128, 4, 3), groups=4)),
    (None, dict(bt=64, gate_up=(64, 64, 4, 4), down=(64, 128, 4, 3), groups=4)),
]
MASKED_MAX_TOKENS = 64  # beyond: the grouped path, which multiplies only the active neurons (H200 sweep)
MASKED_MAX_WASTE = 0.2  # largest expected share of the FFN's weights read for experts no token chose


def masked_config(T: int) -> dict:
    for limit, cfg in MASKED_CONFIGS:
        if limit is None or T <= limit:
            return cfg
    raise AssertionError


def use_masked(T: int, a: int, S: int, E: int) -> bool:
    """Whether the masked path serves T tokens of a layer with S shared pieces and top-a of E
    experts: more pairs than the GEMV path takes, at most MASKED_MAX_TOKENS tokens, and the
    gate/up weights that it reads for experts no token chose (expected, for uniform routing:
    (1 - a/E)^T of each) at most MASKED_MAX_WASTE of all the FFN's weights (gate/up is 2/3 of
    an expert's). The saved launches (router, alignment) are worth about that much (H200 sweep)."""
    if a == 0 or T * a <= GEMV_MAX_PAIRS or T > min(MASKED_MAX_TOKENS, SHARED_FOLD_MAX_TOKENS):
        return False  # decode at batch 1: the GEMV path reads only the chosen experts
    return 2 / 3 * E * (1 - a / E) ** T / (S + E) <= MASKED_MAX_WASTE


@torch.library.custom_op("cmoe::triton_masked_moe", mutates_args=())
def triton_masked_op(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, shared_gate_up: torch.Tensor | None,
    shared_down: torch.Tensor | None, router_gate: torch.Tensor, router_up: torch.Tensor, bias: torch.Tensor,
    scale: torch.Tensor, linear: bool, act: str, top_k: int,
) -> torch.Tensor:
    """The whole CMoE FFN (router, shared and routed experts) on the masked path: [T, K, d],
    whose sum over K is the output (K groups of virtual experts)."""
    return _masked_moe(x, gate_up, down, (shared_gate_up, shared_down) if shared_down is not None else None,
                       (router_gate, router_up, bias, scale, linear), act, top_k)


@triton_masked_op.register_fake
def _(x, gate_up, down, shared_gate_up, shared_down, router_gate, router_up, bias, scale, linear, act, top_k):
    m = down.shape[2]
    S = 0 if shared_down is None else triton.cdiv(shared_down.shape[1], m)
    K = _expert_groups(S, down.shape[0], masked_config(x.shape[0])["groups"])[0]
    return x.new_empty(x.shape[0], K, x.shape[1])


def _masked_moe(x, gate_up, down, shared, router, act: str, top_k: int, cfg: dict | None = None) -> torch.Tensor:
    """``shared``: None or (shared_gate_up [2ms, d], shared_down [d, ms]); ``router``: (gate, up,
    bias, scale, linear), as ``triton_route_op`` takes them. [T, K, d]."""
    _check(x, None, None, gate_up, down, act)
    T, d = x.shape
    E, m = down.shape[0], down.shape[2]
    rg, ru, bias, scale, linear = router
    x, gate_up, down, rg, ru = x.contiguous(), gate_up.contiguous(), down.contiguous(), rg.contiguous(), ru.contiguous()
    ms, S, sgu, sd = _shared_pieces(shared, gate_up, down)
    cfg = cfg or masked_config(T)
    bt = cfg["bt"]
    tiles = triton.cdiv(T, bt)
    be = max(16, triton.next_power_of_2(E))
    scores = torch.empty(2, tiles * bt, be, device=x.device, dtype=torch.float32)
    h = torch.empty(T, S + E, m, device=x.device, dtype=x.dtype)
    K, gs = _expert_groups(S, E, cfg["groups"])
    out = torch.empty(T, K, d, device=x.device, dtype=x.dtype)
    if T == 0:
        return out
    ieee = x.dtype == torch.float32
    r_ieee = _router_ieee(x, rg)
    upcast = _INTERPRET and not ieee
    code = _ACT_CODE[act]
    bn, bk, nw, ns = cfg["gate_up"]
    _masked_gate_up[(tiles, triton.cdiv(m, bn), S + E + 1)](
        x, gate_up, sgu, rg, ru, h, scores, T, d, m, ms, E, tiles * bt,
        S=S, ACT=code, BT=bt, BN=bn, BK=bk, BE=be, UPCAST=upcast, IEEE=ieee, R_IEEE=r_ieee,
        LINEAR=linear, num_warps=nw, num_stages=ns,
    )
    bn, bk, nw, ns = cfg["down"]
    _masked_down[(tiles, triton.cdiv(d, bn), K)](
        h, scores, bias, scale, down, sd, out, T, d, m, ms, E, gs, tiles * bt,
        A=top_k, S=S, K=K, ACT=code, BT=bt, BN=bn, BK=bk, BE=be, UPCAST=upcast, IEEE=ieee, LINEAR=linear,
        num_warps=nw, num_stages=ns,
    )
    return out


def masked_moe(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The FFN output [T, d] of a ``CMoEMLP`` on the masked path, or None where ``use_masked``
    sends these shapes to the other paths."""
    spec = layer.spec
    m = spec.expert_size
    S = triton.cdiv(spec.shared_size, m)
    if not use_masked(x.shape[0], spec.top_k, S, spec.num_experts):
        return None
    return triton_masked_op(x, *layer_args(layer)).sum(1)  # bf16 too: summed in float32, rounded once


def layer_args(layer) -> tuple:
    """A ``CMoEMLP``'s weights and settings as the whole-layer ops take them, after x: (gate_up,
    down, shared_gate_up, shared_down, router gate, up, bias, scale, linear, act, top_k); the
    shared weights None without a shared expert."""
    spec = layer.spec
    shared = (layer.shared_gate_up.weight, layer.shared_down.weight) if spec.shared_size else (None, None)
    return (layer.experts.gate_up_proj, layer.experts.down_proj, *shared, *router_args(layer.router),
            activations.canonical(spec.act), spec.top_k)


# ----------------------------------------------------------------------------- dense path: the whole layer
# Batches of 128-384 tokens in layers with half or more of their neurons active: the routing touches
# every expert, so the layer reads as many bytes as the dense FFN; cuBLAS runs every neuron and the
# routing becomes a mask. As one op: the router, then the shared expert, on a second stream
# (``_Beside``) beside the routed experts' gate/up GEMM; ``glu`` applies each token's routing
# weights (0 for the experts it did not choose) with the activation; one batched GEMM over the
# experts' down projections; ``sum_rows`` adds the experts' rows and the shared expert's output.
# Layers that the op cannot serve (their routing asked for, an adapter on the shared expert) run
# the same GEMMs as torch ops (``cmoe.experts.dense_experts``, in ``triton_experts``).
DENSE_MIN_TOKENS = 128  # the dense path from this many tokens (H200: below, the grouped path is faster)
DENSE_MAX_WORK = 384  # ... while tokens x (all neurons / active neurons) is at most this (H200: run o's sweep, run aj's A/B)
DENSE_MIN_ACTIVE = 0.5  # ... in layers with at least this share of their neurons active (H200, run o)


def use_dense(T: int, active: int, total: int) -> bool:
    """Whether the dense path (cuBLAS on every neuron, the routing as a mask) serves T tokens of a
    layer with ``active`` of ``total`` neurons in use per token: at least DENSE_MIN_ACTIVE of them
    active, from DENSE_MIN_TOKENS, while the FLOPs it multiplies (total / active times those
    needed) stay under DENSE_MAX_WORK tokens' worth. On the H200: S3A3E8 at 128-288 tokens and
    S2A2E8 at 128-192, where the grouped kernels' GEMMs run below cuBLAS's rate
    (``bench_experts.py --paths``; run o in docs/benchmarks/speed-h200-log.md). In the whole decode
    step S2A2E8 at b=256 ran faster on the grouped kernels (run aj: 0.9935x against 0.9862x dense
    on llama2-7b, 1.0132x against 1.0023x on llama3-8b; ``bench_ab.py``)."""
    return T >= DENSE_MIN_TOKENS and active >= DENSE_MIN_ACTIVE * total and T * total <= DENSE_MAX_WORK * active


@torch.library.custom_op("cmoe::triton_dense_moe", mutates_args=())
def triton_dense_op(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, shared_gate_up: torch.Tensor | None,
    shared_down: torch.Tensor | None, router_gate: torch.Tensor, router_up: torch.Tensor, bias: torch.Tensor,
    scale: torch.Tensor, linear: bool, act: str, top_k: int,
) -> torch.Tensor:
    """The whole CMoE FFN (router, shared and routed experts) on the dense path: [T, d]."""
    _check(x, None, None, gate_up, down, act)
    T, d = x.shape
    E, m = down.shape[0], down.shape[2]
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    beside = _Beside(x, on=SHARED_STREAM)
    with torch.cuda.stream(beside.side):
        idx, wt, _ = triton_route_op(x, router_gate, router_up, bias, scale, act, top_k, linear)
        routed = beside.mark()
        shared = shared_down is not None
        extra = dense_expert(x, shared_gate_up.contiguous(), shared_down.contiguous(), act) if shared else None
    gu = x @ gate_up.view(E * 2 * m, d).T  # [T, E * 2m]
    beside.wait_mark(routed, idx, wt)
    h = glu(gu.view(T * E, 2 * m), act, routing=(idx, wt)).view(T, E, m)
    y = torch.bmm(h.transpose(0, 1), down.transpose(1, 2))  # [E, T, d]
    return sum_rows(y.view(E * T, d), E, extra=beside.wait(extra), by_slot=True)


def _whole_layer_fake(x, gate_up, down, shared_gate_up, shared_down, router_gate, router_up, bias, scale, linear, act, top_k):
    """The output of the whole-layer ops that return only [T, d] (dense, GEMV) for tracing."""
    return torch.empty_like(x)


triton_dense_op.register_fake(_whole_layer_fake)


def dense_moe(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The FFN output [T, d] of a ``CMoEMLP`` on the dense path, or None where ``use_dense`` sends
    these shapes to the other paths."""
    spec = layer.spec
    if spec.top_k == 0 or not use_dense(x.shape[0], spec.active_size, spec.intermediate_size):
        return None
    return triton_dense_op(x, *layer_args(layer))


# ----------------------------------------------------------------------------- GEMV path: the whole layer
# Decode at batch 1 in layers with a shared expert: the router and every slot's gate/up GEMV in one
# launch (``_gemv_route_gate_up``: the router's programs first, the shared pieces' next, and the
# routed slots' programs wait on the device for the routing), then the down GEMV over every slot.
# H200, batch-1 decode, S1A1E8 on llama2-7b, 4 layers: 0.4346-0.4351 ms per step against 0.4512-0.4517
# with the router's two kernels on a second stream beside the shared pieces' gate/up and the routed
# gate/up as a launch of its own, and 0.4377-0.4399 with the flags zeroed by a fill kernel in each
# layer instead of by the down kernel (docs/benchmarks/speed-h200-log.md, "Run w")
GEMV_LAYER_OP = True  # the GEMV path as one op (router, shared and routed experts)


def _gemv_sync(x: torch.Tensor) -> torch.Tensor:
    """The flags of ``_gemv_route_gate_up`` for x's device and current stream (``stream_flags``):
    [2] int32; the down kernel that follows each launch sets them back to 0."""
    return stream_flags("gemv_route_gate_up", 2, x.device)


def _gemv_route_gate_up_all(x, gate_up, sgu, ms: int, S: int, router_gate, router_up, bias, scale, linear: bool,
                            act: str, top_k: int, sync: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [T, S + a, m] float32, idx, weight): the router and every slot's act(gate) * up in one
    launch (``_gemv_route_gate_up``; T <= ROUTE_TILE tokens); ``sync``: [2] int32 zeros."""
    T, d = x.shape
    E, m = gate_up.shape[0], gate_up.shape[1] // 2
    router_gate, router_up = router_gate.contiguous(), router_up.contiguous()
    idx, wt, p, be, ieee, upcast = _route_outputs(x, router_gate, top_k)
    rbk, kper, splits = _route_slices(d)
    part = torch.empty(splits, 2, ROUTE_TILE, be, device=x.device, dtype=torch.float32)
    h = torch.empty(T, S + top_k, m, device=x.device, dtype=torch.float32)
    bn, bk, nw = _gemv_gate_up_tiles(GEMV_CONFIG, m, d, T * (S + top_k))
    nb = triton.cdiv(m, bn)
    _gemv_route_gate_up[(splits + nb * T * (S + top_k),)](
        x, idx, gate_up, sgu, h, router_gate, router_up, bias, scale, wt, p, part, sync,
        T, d, m, ms, E, kper, nb,
        A=top_k, S=S, ACT=_ACT_CODE[act], BN=bn, BK=bk, SPLITS=splits, BT=ROUTE_TILE, BE=be, RBK=rbk,
        UPCAST=upcast, IEEE=ieee, LINEAR=linear, num_warps=nw, **pdl.launch(x),
    )
    return h, idx, wt


@torch.library.custom_op("cmoe::triton_gemv_moe", mutates_args=())
def triton_gemv_op(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, shared_gate_up: torch.Tensor | None,
    shared_down: torch.Tensor | None, router_gate: torch.Tensor, router_up: torch.Tensor, bias: torch.Tensor,
    scale: torch.Tensor, linear: bool, act: str, top_k: int,
) -> torch.Tensor:
    """The whole CMoE FFN (router, shared and routed experts) on the GEMV path: [T, d]."""
    _check(x, None, None, gate_up, down, act)
    if x.shape[0] > ROUTE_TILE:
        raise ValueError(f"the GEMV path takes at most {ROUTE_TILE} tokens, got {x.shape[0]}")
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    ms, S, sgu, sd = _shared_pieces((shared_gate_up, shared_down) if shared_down is not None else None, gate_up, down)
    sync = _gemv_sync(x)
    h, idx, wt = _gemv_route_gate_up_all(x, gate_up, sgu, ms, S, router_gate, router_up, bias, scale, linear, act, top_k, sync)
    return _gemv_down_all(h, idx, wt, down, sd, ms, S, GEMV_CONFIG, x.dtype, sync=sync)


triton_gemv_op.register_fake(_whole_layer_fake)


def gemv_moe(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The FFN output [T, d] of a ``CMoEMLP`` on the GEMV path, or None where it does not serve:
    more pairs than GEMV_MAX_PAIRS, no shared expert (the op computes such layers too, but its
    speed was measured only with one: they take the router, then the experts), or GEMV_LAYER_OP
    off."""
    spec = layer.spec
    if not (GEMV_LAYER_OP and spec.shared_size and 0 < x.shape[0] * spec.top_k <= GEMV_MAX_PAIRS):
        return None
    return triton_gemv_op(x, *layer_args(layer))


def layer_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The FFN output [T, d] of a ``CMoEMLP`` from the paths that run the whole layer, router
    included (GEMV, masked, dense), or None where none serves these shapes."""
    for path in (gemv_moe, masked_moe, dense_moe):
        out = path(layer, x)
        if out is not None:
            return out
    return None


# ----------------------------------------------------------------------------- the op
def _check(x, idx, weight, gate_up, down, act):
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "the 'triton' expert implementation needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            "importing cmoe.triton_experts); use impl='grouped' or 'gather' on the CPU"
        )
    if act not in _ACT_CODE:
        raise ValueError(f"activation {act!r} not supported by the Triton kernels; supported: {sorted(_ACT_CODE)}")


SHARED_FOLD_MAX_TOKENS = 256  # up to this many tokens the shared expert runs inside the expert kernels (H200 sweep)
PREFILL_SLOTS = True  # beyond, on the grouped path: the shared expert's output and each routed slot's in one [T, K, d]
# for the caller to sum (a compiled model fuses the sum into the residual add), not summed in the op


def _prefill_slots(path: str, T: int) -> bool:
    """Whether the op returns the prefill's slots (``PREFILL_SLOTS``) for T tokens on ``path``."""
    return PREFILL_SLOTS and path == "grouped" and T > SHARED_FOLD_MAX_TOKENS


def _plan(T: int, a: int, ms: int, m: int, E: int, gmm: bool = False) -> tuple[str, int]:
    """(path, S) for T tokens, top-a routing over E experts and a shared expert of width ms (0:
    none): the kernels that run, and how many m-wide shared pieces they fold in (0: cuBLAS runs the
    shared expert, or there is none). ``gmm``: ``torch._grouped_mm`` serves these experts
    (``grouped_mm_ok``); it is used once the experts get GROUPED_MM_MIN_ROWS rows each on average."""
    S = triton.cdiv(ms, m) if a > 0 and T <= SHARED_FOLD_MAX_TOKENS else 0
    if T * a <= GEMV_MAX_PAIRS:
        return "gemv", S
    if T <= FEW_MAX_TOKENS:
        return "few", S
    return ("grouped_mm" if gmm and S == 0 and T * a >= GROUPED_MM_MIN_ROWS * E else "grouped"), S


def _slots(T: int, a: int, ms: int, m: int, E: int, gmm: bool = False) -> int:
    """The op's middle dimension: one output per (token, slot) on the grouped path up to
    SHARED_FOLD_MAX_TOKENS tokens (decode: a compiled model fuses their sum into the next kernel)
    and beyond (the shared expert's output as one more slot; ``PREFILL_SLOTS`` off: one per token,
    summed in the op), one per group of experts on the few-token path, else one per token."""
    path, S = _plan(T, a, ms, m, E, gmm)
    if T == 0 or a == 0 or path in ("gemv", "grouped_mm"):
        return 1
    if path == "few":
        return _expert_groups(S, E, FEW_DOWN_GROUPS)[0]
    if T <= SHARED_FOLD_MAX_TOKENS:
        return S + a
    return a + (ms > 0) if _prefill_slots(path, T) else 1  # prefill on the grouped path: the shared expert's slot, the routed ones


@torch.library.custom_op("cmoe::triton_experts", mutates_args=())
def triton_experts_op(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: str,
    shared_gate_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts, plus the shared expert when its weights are given: [T, K, d], whose sum
    over K is the FFN output (``_slots``). Up to SHARED_FOLD_MAX_TOKENS tokens the grouped path
    returns each slot's output and the few-token path one partial sum per group of experts; the
    caller sums them, so that a compiled model fuses the sum into the next kernel. Beyond (prefill),
    the grouped path returns the shared expert's output (slot 0, if any) and each routed slot's for the
    caller to sum in the same way (``PREFILL_SLOTS``; off: the op sums them itself in one pass, K = 1),
    and the grouped_mm path sums them itself (K = 1)."""
    _check(x, idx, weight, gate_up, down, act)
    T, a = idx.shape
    m = down.shape[2]
    ms = 0 if shared_down is None else shared_down.shape[1]
    if T == 0 or (a == 0 and ms == 0):
        return x.new_zeros(T, 1, x.shape[1])
    path, S = _plan(T, a, ms, m, down.shape[0], grouped_mm_ok(x, x.shape[1], m))
    x, idx, weight = x.contiguous(), idx.contiguous(), weight.contiguous().float()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    shared = (shared_gate_up.contiguous(), shared_down.contiguous()) if ms else None
    if a == 0:
        return dense_expert(x, *shared, act)[:, None]
    y = None  # prefill on the grouped path: every slot's output, the shared expert's in slot 0
    if _prefill_slots(path, T):
        y = torch.empty(T, a + (ms > 0), x.shape[1], device=x.device, dtype=x.dtype)
    # prefill: cuBLAS runs the shared expert beside the routed path (after y's allocation: it writes slot 0)
    beside, extra = _shared_beside(x, None if S else shared, act, out=None if y is None else y[:, 0])
    fold = shared if S else None
    if path == "grouped_mm":
        return _grouped_mm_experts(x, idx, weight, gate_up, down, act, extra, beside)[:, None]
    if path == "gemv":
        out = _gemv_experts(x, idx, weight, gate_up, down, act, shared=fold)[:, None]
    elif path == "few":
        out = _few_experts(x, idx, weight, gate_up, down, act, shared=fold)
    elif y is not None:
        _grouped_experts(x, idx, weight, gate_up, down, act, y=y, y_first=int(ms > 0))
        beside.wait(extra)  # slot 0 written on the side stream
        return y
    else:
        out = _grouped_experts(x, idx, weight, gate_up, down, act, shared=fold)
        if T > SHARED_FOLD_MAX_TOKENS:  # prefill: the slots and the shared expert summed in one pass
            return sum_rows(out.view(-1, out.shape[2]), out.shape[1], extra=beside.wait(extra))[:, None]
    if extra is not None:
        out[:, 0] += beside.wait(extra)
    return out


@triton_experts_op.register_fake
def _(x, idx, weight, gate_up, down, act, shared_gate_up=None, shared_down=None):
    T, a = idx.shape
    ms = 0 if shared_down is None else shared_down.shape[1]
    m = down.shape[2]
    return x.new_empty(T, _slots(T, a, ms, m, down.shape[0], grouped_mm_ok(x, x.shape[1], m)), x.shape[1])


# Compiled, on the grouped_mm path, for top-k up to GMM_ROWS_MAX_SLOTS (0: never): the rows op, and
# their weighted sum in torch ops, which inductor fuses into the residual add, instead of the op's own
# pass. H200, 4 layers, 3 rounds, medians (docs/benchmarks/speed-h200-log.md, "Run ah"): top-2 shorter in
# every round at 1x2048 (S2A2E8: 21 us on llama2-7b, 34 us on llama3-8b) and 1.3 % shorter at 8x2048
# (llama3-8b S2A2E16, 6 rounds); top-3 (S3A3E8) 30-34 us longer at 1x2048 on both shapes.
GMM_ROWS_MAX_SLOTS = 2


@torch.library.custom_op("cmoe::triton_grouped_mm_rows", mutates_args=())
def grouped_mm_rows_op(
    x: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: str,
    shared_gate_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped_mm path without its weighted sum: (rows [T*a, d], each pair's expert output,
    unweighted, in the experts' order; pos [T, a] int64, each pair's row; the shared expert's output
    [T, d], computed by cuBLAS on the second stream, or [0, d] without one). The FFN output is
    ``extra[t] + sum_k weight[t, k] * rows[pos[t, k]]``, which a compiled model fuses into the
    kernel that uses it (``triton_experts``, up to ``GMM_ROWS_MAX_SLOTS``)."""
    _check(x, idx, None, gate_up, down, act)
    T, a = idx.shape
    ms = 0 if shared_down is None else shared_down.shape[1]
    x, idx, gate_up, down = x.contiguous(), idx.contiguous(), gate_up.contiguous(), down.contiguous()
    beside, extra = _shared_beside(x, (shared_gate_up.contiguous(), shared_down.contiguous()) if ms else None, act)
    rows, pos, extra = _grouped_mm_rows(x, idx, gate_up, down, act, extra, beside)
    return rows, pos.view(T, a), extra if ms else x.new_empty(0, x.shape[1])


@grouped_mm_rows_op.register_fake
def _(x, idx, gate_up, down, act, shared_gate_up=None, shared_down=None):
    T, a = idx.shape
    shared = shared_down is not None and shared_down.shape[1] > 0
    return x.new_empty(T * a, x.shape[1]), idx.new_empty(T, a, dtype=torch.int64), x.new_empty(T if shared else 0, x.shape[1])


def _gmm_rows_sum(x, idx, weight, gate_up, down, act: str, shared_gate_up=None, shared_down=None) -> torch.Tensor:
    """[T, d]: ``grouped_mm_rows_op``'s rows weighted and summed per token in torch ops, in
    ``sum_rows``'s order (the shared expert's output first, then slot by slot, in float32, rounded
    once), for inductor to fuse the gather and the sum into the kernel that uses the output."""
    rows, pos, extra = grouped_mm_rows_op(x, idx, gate_up, down, act, shared_gate_up, shared_down)
    y = extra.float() if extra.shape[0] else torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for k in range(idx.shape[1]):
        y = y + rows[pos[:, k]].float() * weight[:, k, None].float()
    return y.to(x.dtype)


@register("triton")
def triton_experts(x, idx, weight, gate_up, down, act: str, shared_gate_up=None, shared_down=None) -> torch.Tensor:
    """Triton kernels: a GEMV over the selected experts for few pairs, a grouped GEMM beyond;
    with ``shared_gate_up [2ms, d]`` / ``shared_down [d, ms]``, the shared expert is added
    (folded into the same kernels for up to ``SHARED_FOLD_MAX_TOKENS`` tokens). For the batches
    of ``use_dense``, cuBLAS on every expert with the routing as a mask (``dense_experts``),
    as plain torch ops, so that a compiled model fuses the elementwise work around the GEMMs
    (``CMoEMLP`` runs those batches through ``dense_moe`` where it can)."""
    T, a = idx.shape
    E, m = down.shape[0], down.shape[2]
    ms = 0 if shared_down is None else shared_down.shape[1]
    act = activations.canonical(act)
    if a > 0 and use_dense(T, ms + a * m, ms + E * m):
        y = dense_experts(x, idx, weight, gate_up, down, act)
        return y + shared_expert(x, shared_gate_up, shared_down, act) if ms else y
    # compiled, on the grouped_mm path (prefill): the rows op, and their weighted sum in torch ops, which
    # inductor fuses into the residual add instead of the op's own pass (GMM_ROWS_MAX_SLOTS; eagerly, that pass)
    if 0 < a <= GMM_ROWS_MAX_SLOTS and torch.compiler.is_compiling() and _plan(T, a, ms, m, E, grouped_mm_ok(x, x.shape[1], m))[0] == "grouped_mm":
        return _gmm_rows_sum(x, idx, weight, gate_up, down, act, shared_gate_up, shared_down)
    y = triton_experts_op(x, idx, weight, gate_up, down, act, shared_gate_up, shared_down)
    return y[:, 0] if y.shape[1] == 1 else y.sum(1)  # bf16 too: summed in float32, rounded once
