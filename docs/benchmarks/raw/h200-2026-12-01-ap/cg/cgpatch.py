"""Session 37: the grouped_mm path's two GEMMs (cmoe.experts.grouped_pairs) through CUTLASS's pointer-array grouped
GEMMs of libcg.so instead of torch._grouped_mm. MODE: "torch" (off), or "<gate/up config>,<down config>"."""
import torch
import triton
import triton.language as tl

import cmoe.experts as ex
import cmoe.triton_experts as te
from cg_bench import Grouped

MODE = "torch"
_torch_pairs = ex.grouped_pairs
_CACHE = {}


@triton.jit
def _ptrs(ends_ptr, shapes_ptr, pa_ptr, pb_ptr, pd_ptr, a_base, b_base, d_base, E, N, K, BE: tl.constexpr):
    """Each group's problem shape [M_g, N, K] and its A, B, D pointers, from the groups' row ends (one launch)."""
    e = tl.arange(0, BE)
    ok = e < E
    end = tl.load(ends_ptr + e, mask=ok, other=0).to(tl.int64)
    start = tl.load(ends_ptr + e - 1, mask=ok & (e > 0), other=0).to(tl.int64)
    tl.store(shapes_ptr + e * 3, (end - start).to(tl.int32), mask=ok)
    tl.store(shapes_ptr + e * 3 + 1, tl.zeros_like(e) + N, mask=ok)
    tl.store(shapes_ptr + e * 3 + 2, tl.zeros_like(e) + K, mask=ok)
    tl.store(pa_ptr + e, a_base + start * K * 2, mask=ok)
    tl.store(pb_ptr + e, b_base + e.to(tl.int64) * N * K * 2, mask=ok)
    tl.store(pd_ptr + e, d_base + start * N * 2, mask=ok)


GLUE = "triton"  # "torch": the pointers from torch ops (call 4-6)


def cutlass_mm(a, w, ends, name):
    """rows ends[e-1]:ends[e] of a [R, k] times w[e] [n, k]^T: [R, n]."""
    E, N, K = w.shape
    key = (name, E, N, K)
    if key not in _CACHE:
        _CACHE[key] = Grouped(name, E, N, K)
    out = torch.empty(a.shape[0], N, device=a.device, dtype=a.dtype)
    if GLUE == "triton":
        shapes = torch.empty(E, 3, device=a.device, dtype=torch.int32)
        p = torch.empty(3, E, device=a.device, dtype=torch.int64)
        _ptrs[(1,)](ends, shapes, p[0], p[1], p[2], a.data_ptr(), w.data_ptr(), out.data_ptr(), E, N, K,
                    BE=triton.next_power_of_2(E))
        _CACHE[key](shapes, p[0], p[1], p[2])
        return out
    ends = ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    shapes = torch.stack([ends - starts, torch.full_like(ends, N), torch.full_like(ends, K)], 1).int()
    pa = starts * (K * a.element_size()) + a.data_ptr()
    pb = torch.arange(E, device=a.device, dtype=torch.int64) * (N * K * w.element_size()) + w.data_ptr()
    pd = starts * (N * out.element_size()) + out.data_ptr()
    _CACHE[key](shapes, pa, pb, pd)
    return out


def grouped_pairs(x, tokens, ends, gate_up, down, glu_fn):
    if MODE == "torch" or x.dtype != torch.bfloat16:
        return _torch_pairs(x, tokens, ends, gate_up, down, glu_fn)
    c1, c2 = MODE.split(",")
    gu = cutlass_mm(x.index_select(0, tokens), gate_up.contiguous(), ends, c1)
    return cutlass_mm(glu_fn(gu), down.contiguous(), ends, c2)


ex.grouped_pairs = grouped_pairs
te.grouped_pairs = grouped_pairs

# ---- FOLD: the shared expert as group 0 of the same CUTLASS launches (its A is x itself, not gathered)
FOLD = False
_shared_beside = te._shared_beside
_grouped_mm_rows = te._grouped_mm_rows


class _NoSide:
    def wait(self, t):
        return t


def shared_beside(x, shared, act, out=None):
    if FOLD and MODE != "torch" and shared is not None and out is None and x.dtype == torch.bfloat16:
        return _NoSide(), ("fold", shared)
    return _shared_beside(x, shared, act, out=out)


@triton.jit
def _ptrs_fold(ends_ptr, shapes_ptr, pa_ptr, pb_ptr, pd_ptr, a0, a_base, b0, b_base, d0, d_base, T, E, N0, N, K0, K,
               BE: tl.constexpr):
    """Group 0: the shared expert (T rows of a0 times b0 into d0, N0 x K0); groups 1..E: the routed experts
    (rows ends[e-1]:ends[e] of a_base times b_base[e] into d_base, N x K)."""
    g = tl.arange(0, BE)
    ok = g < E + 1
    e = g - 1
    end = tl.load(ends_ptr + e, mask=ok & (g > 0), other=0).to(tl.int64)
    start = tl.load(ends_ptr + e - 1, mask=ok & (g > 1), other=0).to(tl.int64)
    first = g == 0
    tl.store(shapes_ptr + g * 3, tl.where(first, T, end - start).to(tl.int32), mask=ok)
    tl.store(shapes_ptr + g * 3 + 1, tl.where(first, N0, N), mask=ok)
    tl.store(shapes_ptr + g * 3 + 2, tl.where(first, K0, K), mask=ok)
    tl.store(pa_ptr + g, tl.where(first, a0, a_base + start * K * 2), mask=ok)
    tl.store(pb_ptr + g, tl.where(first, b0, b_base + e.to(tl.int64) * N * K * 2), mask=ok)
    tl.store(pd_ptr + g, tl.where(first, d0, d_base + start * N * 2), mask=ok)


def fold_mm(a0, w0, a, w, ends, name):
    """(a0 [T, K0] @ w0 [N0, K0]^T, rows ends[e-1]:ends[e] of a [R, K] times w[e] [N, K]^T) in one launch."""
    E, N, K = w.shape
    N0, K0 = w0.shape
    key = ("fold", name, E, N0, K0, N, K)
    if key not in _CACHE:
        _CACHE[key] = Grouped(name, E + 1, [N0] + [N] * E, [K0] + [K] * E)
    d0 = torch.empty(a0.shape[0], N0, device=a.device, dtype=a.dtype)
    out = torch.empty(a.shape[0], N, device=a.device, dtype=a.dtype)
    shapes = torch.empty(E + 1, 3, device=a.device, dtype=torch.int32)
    p = torch.empty(3, E + 1, device=a.device, dtype=torch.int64)
    _ptrs_fold[(1,)](ends, shapes, p[0], p[1], p[2], a0.data_ptr(), a.data_ptr(), w0.data_ptr(), w.data_ptr(),
                     d0.data_ptr(), out.data_ptr(), a0.shape[0], E, N0, N, K0, K, BE=triton.next_power_of_2(E + 1))
    _CACHE[key](shapes, p[0], p[1], p[2])
    return d0, out


def grouped_mm_rows(x, idx, gate_up, down, act, extra=None, beside=None):
    if not (isinstance(extra, tuple) and extra and extra[0] == "fold"):
        return _grouped_mm_rows(x, idx, gate_up, down, act, extra, beside)
    sgu, sd = extra[1]
    c1, c2 = MODE.split(",")
    tokens, ends, pos = te.sort_pairs(idx, gate_up.shape[0])
    gu0, gu = fold_mm(x, sgu.contiguous(), x.index_select(0, tokens), gate_up.contiguous(), ends, c1)
    y0, rows = fold_mm(te.glu(gu0, act), sd.contiguous(), te.glu(gu, act), down.contiguous(), ends, c2)
    return rows, pos, y0


te._shared_beside = shared_beside
te._grouped_mm_rows = grouped_mm_rows
