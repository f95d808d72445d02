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
