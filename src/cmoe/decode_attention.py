"""Attention of one query token over a KV cache (decode), in one Triton launch.

The same function as ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)``
for a single query position, with grouped-query heads read in place (no ``repeat_kv`` copy of the
cache, which transformers' SDPA attention makes under torch.compile whenever it passes a mask)::

    out[b, h] = softmax(scaling * q[b, h] . k[b, h // G]^T  where mask[b, :], else -inf) @ v[b, h // G]

One program per (batch row, key/value head, slice of the cache) runs flash attention's online
softmax over its slice for the G query heads that share the key/value head. When the cache is cut
into several slices (few rows and heads: batch-1 decode), each program stores its partial result,
takes a ticket, and the last program of a (row, head) merges the slices, so that no second launch
is needed. No host synchronisation: it captures in a CUDA graph and traces as one op.

On a machine without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, the
tests), as ``cmoe.triton_experts``'s kernels do.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .triton_experts import _INTERPRET, stream_flags

# H200 sweep (docs/benchmarks/speed-h200.md, run z): fewer (row, head) pairs than SMs (decode at
# batch 1-8) are cut into slices of the cache, to about SPLIT_PROGRAMS_PER_SM programs per SM, each
# slice at least MIN_BLOCKS_PER_SLICE blocks of keys; with as many pairs as SMs, one program each
BLOCK_KEYS = 64  # keys per step of a program's loop, for head sizes up to 128 (fewer beyond, so that
# the pipelined key and value blocks take the same shared memory: 72 KB on sm_90)
SPLIT_PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SLICE = 2
MAX_SLICES = 16  # the merge reads every slice at once
NUM_WARPS, NUM_STAGES = 4, 3
CPU_SMS = 16  # what the interpreter stands in for
_TICKET_SLOTS = 4096  # (row, head) pairs that can be cut into slices; beyond, one slice each


@triton.jit
def _swap_halves(x, R: tl.constexpr, C: tl.constexpr):
    """[R, C] -> the same rows with their two halves of C swapped (C a power of 2)."""
    return tl.reshape(tl.flip(tl.reshape(x, (R, 2, C // 2)), 1), (R, C))


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stat_ptr, ticket_ptr,
    kn_ptr, vn_ptr, cos_ptr, sin_ptr, pos_ptr,  # ROPE: the new token's k and v, its cos and sin, its position
    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l,
    skn_b, skn_h, svn_b, svn_h, sc_b, ss_b,
    L, HKV, G, D, per_slice, qk_scale,
    GP: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, SLICES: tl.constexpr, SP: tl.constexpr,
    HAS_MASK: tl.constexpr, ROPE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait(PDL)  # everything it reads but the cache comes from the kernels just before (cmoe.pdl)
    bh = tl.program_id(0)
    sl = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if ROPE:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[D/2:], x[:D/2]], in float32 (D = DP)
        # the new token's vectors are read into every row of a [GP, DP] tile, q's layout (vector loads)
        cols = offs_d[None, :] + 0 * offs_g[:, None]
        cos = tl.load(cos_ptr + b * sc_b + cols).to(tl.float32)
        sin = tl.load(sin_ptr + b * ss_b + cols).to(tl.float32) * tl.where(cols < DP // 2, -1.0, 1.0)
        q = q.to(tl.float32)
        q = (q * cos + _swap_halves(q, GP, DP) * sin).to(q_ptr.dtype.element_ty)
        kn = tl.load(kn_ptr + b * skn_b + h * skn_h + cols).to(tl.float32)
        kn = (kn * cos + _swap_halves(kn, GP, DP) * sin).to(k_ptr.dtype.element_ty)
        vn = tl.load(vn_ptr + b * svn_b + h * svn_h + cols)
        pos = tl.load(pos_ptr)
    if UPCAST or IEEE:
        q = q.to(tl.float32)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    start = sl * per_slice
    stop = tl.minimum(start + per_slice, L)
    k_base = k_ptr + b.to(tl.int64) * sk_b + h * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * sv_h
    for n0 in range(start, stop, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < stop
        kb = tl.load(k_base + offs_n[:, None] * sk_l + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        vb = tl.load(v_base + offs_n[:, None] * sv_l + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST or IEEE:
            kb = kb.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kb))
        ok = n_ok
        if ROPE:
            ok = ok & (offs_n != pos)  # the new token's key: after the loop, from registers
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * sm_b + offs_n * sm_l, mask=n_ok, other=0) != 0)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))  # [GP, BN], log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slice with no key yet: nothing to rescale
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST or IEEE:
            vb = vb.to(tl.float32)
        else:
            p = p.to(vb.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vb)
        m_i = m_new
    if ROPE:
        if (pos >= start) & (pos < stop):  # the one program whose slice holds the new position: its key, and the write
            s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale  # [GP]
            if HAS_MASK:
                s_new = tl.where(tl.load(mask_ptr + b * sm_b + pos * sm_l) != 0, s_new, float("-inf"))
            m_new = tl.maximum(m_i, s_new)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p_new = tl.exp2(s_new - m_use)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)
            m_i = m_new
            first_row = (offs_g == 0)[:, None] & (cols >= 0)
            tl.store(k_base + pos * sk_l + cols, kn, mask=first_row)
            tl.store(v_base + pos * sv_l + cols, vn, mask=first_row)
    out_rows = out_ptr + (b * HKV + h).to(tl.int64) * G * D + offs_g[:, None] * D + offs_d[None, :]
    out_ok = g_ok[:, None] & d_ok[None, :]
    if SLICES == 1:
        tl.store(out_rows, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        # this slice's (max, sum, unnormalised output) for the G real query heads; the last slice to
        # finish merges them, every slice's loads issued at once (SLICES is small: MAX_SLICES)
        part = part_ptr + (bh * SLICES + sl).to(tl.int64) * GP * DP
        tl.store(part + offs_g[:, None] * DP + offs_d[None, :], acc, mask=out_ok)
        stat = stat_ptr + (bh * SLICES + sl) * 2 * GP
        tl.store(stat + offs_g, m_i, mask=g_ok)
        tl.store(stat + GP + offs_g, l_i, mask=g_ok)
        if tl.atomic_add(ticket_ptr + bh, 1) == SLICES - 1:  # acq_rel: every other slice's stores are visible
            offs_s = tl.arange(0, SP)
            st = stat_ptr + (bh * SLICES + offs_s[:, None]) * 2 * GP + offs_g[None, :]  # [SP, GP]
            st_ok = (offs_s[:, None] < SLICES) & g_ok[None, :]
            m_s = tl.load(st, mask=st_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(st + GP, mask=st_ok, other=0.0, cache_modifier=".cg")
            m_all = tl.max(m_s, 0)
            w = tl.exp2(m_s - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])  # [SP, GP]
            total = tl.sum(w * l_s, 0)
            merged = tl.zeros((GP, DP), tl.float32)
            for j in tl.static_range(SLICES):
                w_j = tl.sum(tl.where(offs_s[:, None] == j, w, 0.0), 0)  # [GP]
                pa = part_ptr + (bh * SLICES + j).to(tl.int64) * GP * DP
                merged += w_j[:, None] * tl.load(pa + offs_g[:, None] * DP + offs_d[None, :], mask=out_ok, other=0.0,
                                                 cache_modifier=".cg")
            tl.store(out_rows, (merged / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(ticket_ptr + bh, 0)  # back to 0 for the next call


def _tickets(device: torch.device) -> torch.Tensor:
    """The merge tickets for ``device`` and its current stream (``stream_flags``); the last program
    of each (row, head) sets its ticket back to 0."""
    return stream_flags("decode_attention", _TICKET_SLOTS, device)


def block_keys(head_size: int) -> int:
    """Keys per step of a program's loop for this head size."""
    return max(16, BLOCK_KEYS * 128 // max(128, triton.next_power_of_2(head_size)))


def _slices(rows_heads: int, length: int, device: torch.device, bn: int | None = None) -> tuple[int, int]:
    """(slices, keys per slice) of a cache of ``length`` positions read by ``rows_heads`` (row,
    key/value head) pairs, in blocks of ``bn`` keys (default BLOCK_KEYS)."""
    bn = bn or BLOCK_KEYS
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_SMS
    blocks = triton.cdiv(max(length, 1), bn)
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, rows_heads) if rows_heads < min(sms, _TICKET_SLOTS) else 1
    per = max(MIN_BLOCKS_PER_SLICE, triton.cdiv(blocks, max(1, min(want, MAX_SLICES)))) if want > 1 else blocks
    return triton.cdiv(blocks, per), per * bn


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
            rope: tuple | None = None) -> torch.Tensor:
    """The attention of ``decode_attention``; ``rope``: None, or (key_new [B, Hkv, 1, D], value_new,
    cos [B, 1, D], sin, pos [] int64) for ``decode_attention_rope``."""
    B, H, _, D = query.shape
    HKV, L = key.shape[1], key.shape[2]
    G = H // HKV
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(B, 1, H, D, device=query.device, dtype=query.dtype)
    if B == 0:
        return out
    gp, dp, bn = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D)), block_keys(D)
    slices, per_slice = _slices(B * HKV, L, query.device, bn)
    part = torch.empty(B * HKV * slices * gp * dp if slices > 1 else 1, device=query.device, dtype=torch.float32)
    stat = torch.empty(B * HKV * slices * 2 * gp if slices > 1 else 1, device=query.device, dtype=torch.float32)
    tickets = _tickets(query.device) if slices > 1 else stat
    if mask is None:
        m, sm_b, sm_l = query, 0, 0  # not read
    else:
        m = mask.view(torch.uint8)
        sm_b, sm_l = (m.stride(0) if m.shape[0] > 1 else 0), m.stride(-1)
    if rope is None:
        kn = vn = cos = sin = pos = query  # not read
        strides = (0,) * 6
    else:
        kn, vn, cos, sin, pos = (t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous() for t in rope)
        strides = (kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
                   cos.stride(0) if cos.shape[0] > 1 else 0, sin.stride(0) if sin.shape[0] > 1 else 0)
    ieee = query.dtype == torch.float32
    _decode_attention_kernel[(B * HKV, slices)](
        query, key, value, m, out, part, stat, tickets, kn, vn, cos, sin, pos,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), sm_b, sm_l, *strides,
        L, HKV, G, D, per_slice, scaling * math.log2(math.e),
        GP=gp, DP=dp, BN=bn, SLICES=slices, SP=max(2, triton.next_power_of_2(slices)), HAS_MASK=mask is not None,
        ROPE=rope is not None, UPCAST=_INTERPRET and not ieee, IEEE=ieee, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        **pdl.launch(query),
    )
    return out


@torch.library.custom_op("cmoe::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """query [B, H, 1, D], key/value [B, Hkv, L, D] (H a multiple of Hkv), mask None or bool
    [B or 1, 1, 1, L] (True: attend) -> [B, 1, H, D], the layout transformers' attention functions
    return."""
    return _launch(query, key, value, mask, scaling)


@decode_attention.register_fake
def _(query, key, value, mask, scaling):
    B, H, _, D = query.shape
    return query.new_empty(B, 1, H, D)


@torch.library.custom_op("cmoe::decode_attention_rope", mutates_args=("key_cache", "value_cache"))
def decode_attention_rope(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, pos: torch.Tensor,
                          mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One decode step of a rotary attention with a static cache, in one launch: query [B, H, 1, D],
    key/value [B, Hkv, 1, D] of the new token before the rotary embedding, cos/sin [B, 1, D] its
    rotary embedding (transformers' LLaMA convention, ``rotate_half``), key_cache/value_cache
    [B, Hkv, L, D], pos [] int64 its position (< L); D a power of 2 from 16. The same as rotating q and k, writing k and v
    at ``pos`` of the caches and ``decode_attention`` over them: it writes them there too."""
    D = query.shape[-1]
    if not rope_head_size_ok(D):
        raise ValueError(f"decode_attention_rope takes head sizes that are powers of 2 from 16, got {D}")
    return _launch(query, key_cache, value_cache, mask, scaling, (key, value, cos, sin, pos))


@decode_attention_rope.register_fake
def _(query, key, value, cos, sin, key_cache, value_cache, pos, mask, scaling):
    B, H, _, D = query.shape
    return query.new_empty(B, 1, H, D)


def rope_head_size_ok(head_size: int) -> bool:
    """Whether ``decode_attention_rope`` takes this head size: a power of 2 from 16."""
    return head_size >= 16 and head_size & (head_size - 1) == 0


def mask_serves(mask: torch.Tensor | None, batch: int, length: int) -> bool:
    """No mask, or a boolean one [batch or 1, 1, 1, length] shared by the heads."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1
                            and mask.shape[0] in (1, batch) and mask.shape[3] == length)


def serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``decode_attention`` computes this attention: one query position, the same head size
    for q, k and v, whole groups of query heads per key/value head, and no mask or a boolean one
    shared by the heads."""
    B, H, _, D = query.shape
    return query.shape[2] == 1 and cache_serves(B, H, D, query.dtype, key, value, mask)


def cache_serves(batch: int, heads: int, head_size: int, dtype: torch.dtype, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None) -> bool:
    """``serves`` for queries of ``batch`` rows, ``heads`` heads of ``head_size`` in ``dtype``, given by
    their sizes (before they are computed)."""
    return (
        head_size == key.shape[-1] == value.shape[-1]
        and key.shape[1] == value.shape[1]
        and key.shape[2] == value.shape[2]
        and heads % key.shape[1] == 0
        and dtype == key.dtype == value.dtype
        and mask_serves(mask, batch, key.shape[2])
    )
