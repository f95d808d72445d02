"""Prototype (session 36): the dense path on packed weights with the router inside the activation kernel.

x @ G.T (cuBLAS, one GEMM or two cut at packed_split) -> _glu_route (each program: the router for its BT
tokens from x, then act(g) * u * w over its share of the neuron blocks) -> h @ D.T (cuBLAS)."""
import torch
import triton
import triton.language as tl

import cmoe.triton_experts as te


@triton.jit
def _glu_route(ga_ptr, gb_ptr, x_ptr, rg_ptr, ru_ptr, bias_ptr, scale_ptr, h_ptr,
               T, d, ms, m, E, N, split, lda, ldb, nbs, nbe,
               A: tl.constexpr, ACT: tl.constexpr, LINEAR: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
               BK: tl.constexpr, BM: tl.constexpr, Q: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = rows < T
    rows64 = rows.to(tl.int64)
    q = tl.program_id(1)
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g = tl.zeros((BT, BE), tl.float32)
    u = tl.zeros((BT, BE), tl.float32)
    for k0 in range(0, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xv = tl.load(x_ptr + rows64[:, None] * d + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        wm = e_ok[:, None] & k_ok[None, :]
        wg = tl.load(rg_ptr + offs_e[:, None] * d + offs_k[None, :], mask=wm, other=0.0).to(tl.float32)
        g += tl.sum(xv[:, None, :] * wg[None, :, :], 2)
        if not LINEAR:
            wu = tl.load(ru_ptr + offs_e[:, None] * d + offs_k[None, :], mask=wm, other=0.0).to(tl.float32)
            u += tl.sum(xv[:, None, :] * wu[None, :, :], 2)
    wmat, _ = te._route_weights(g, u, offs_e, e_ok, bias_ptr, scale_ptr, A, ACT, BE, LINEAR)  # [BT, BE]
    offs = tl.arange(0, BM)
    for blk in range(q, nbs + E * nbe, Q):
        shared = blk < nbs
        e = tl.where(shared, -1, (blk - nbs) // nbe)
        j0 = tl.where(shared, blk, (blk - nbs) % nbe) * BM
        width = tl.where(shared, ms, m)
        g0 = tl.where(shared, 0, 2 * ms + e * (2 * m)) + j0
        u0 = g0 + width
        ok = r_ok[:, None] & (j0 + offs < width)[None, :]
        gp = tl.where(g0 < split, ga_ptr + rows64[:, None] * lda + g0, gb_ptr + rows64[:, None] * ldb + (g0 - split))
        up = tl.where(u0 < split, ga_ptr + rows64[:, None] * lda + u0, gb_ptr + rows64[:, None] * ldb + (u0 - split))
        gv = tl.load(gp + offs[None, :], mask=ok).to(tl.float32)
        uv = tl.load(up + offs[None, :], mask=ok).to(tl.float32)
        w = tl.where(shared, 1.0, tl.sum(tl.where(offs_e[None, :] == e, wmat, 0.0), 1))  # [BT]
        out = h_ptr + rows64[:, None] * N + tl.where(shared, 0, ms + e * m) + j0 + offs[None, :]
        tl.store(out, (te._act(gv, ACT) * uv * w[:, None]).to(h_ptr.dtype.element_ty), mask=ok)


def packed_split(ms, m, E):
    n = ms + E * m
    bounds = [0, ms, 2 * ms] + [2 * ms + k * m for k in range(1, 2 * E + 1)]
    return min(bounds, key=lambda b: abs(b - n))


def glu_route(gu, x, router, ms, m, act, top_k, bt=1, bk=512, bm=1024, q=1, nw=4, h=None):
    """gu: (ga [T, split], gb [T, 2N - split]) the packed x @ G.T cut at split; router: (gate, up, bias, scale, linear)."""
    ga, gb = gu
    T, split = ga.shape
    N = (split + gb.shape[1]) // 2
    E = (N - ms) // m
    rg, ru, bias, scale, linear = router
    if h is None:
        h = torch.empty(T, N, device=ga.device, dtype=ga.dtype)
    be = triton.next_power_of_2(max(E, 2))
    nbs, nbe = triton.cdiv(ms, bm), triton.cdiv(m, bm)
    _glu_route[(triton.cdiv(T, bt), q)](ga, gb, x, rg, ru, bias, scale, h, T, x.shape[1], ms, m, E, N, split,
                                        ga.stride(0), gb.stride(0), nbs, nbe, A=top_k, ACT=te._ACT_CODE[act],
                                        LINEAR=linear, BT=bt, BE=be, BK=bk, BM=bm, Q=q, num_warps=nw)
    return h


def pack(sgu, gu, sd, dn):
    E, d, m = dn.shape
    G = torch.cat([sgu, gu.reshape(E * 2 * m, d)])
    D = torch.cat([sd, dn.permute(1, 0, 2).reshape(d, E * m)], dim=1).contiguous()
    return G, D


def packed_layer(x, G, D, router, ms, m, act, top_k, two=True, **kw):
    if two:
        E = (D.shape[1] - ms) // m
        cut = packed_split(ms, m, E)
        gu = (x @ G[:cut].T, x @ G[cut:].T)
    else:
        full = x @ G.T
        gu = (full, full[:, :0])
    return glu_route(gu, x, router, ms, m, act, top_k, **kw) @ D.T


@triton.jit
def _glu_scores(ga_ptr, gb_ptr, s_ptr, bias_ptr, scale_ptr, h_ptr, ms, m, E, N, split, lda, ldb, nbs, nbe,
                A: tl.constexpr, ACT: tl.constexpr, LINEAR: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr):
    """h[t, c] = w * act(g) * u as _glu_route, with the router's raw scores given: s [T, 2E] float32
    (<x, g_j> then <x, u_j>; LINEAR: [T, E])."""
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    SW: tl.constexpr = 1 if LINEAR else 2
    sg = tl.load(s_ptr + t * SW * E + offs_e, mask=e_ok, other=0.0)[None, :]
    if LINEAR:
        su = sg
    else:
        su = tl.load(s_ptr + t * SW * E + E + offs_e, mask=e_ok, other=0.0)[None, :]
    wmat, _ = te._route_weights(sg, su, offs_e, e_ok, bias_ptr, scale_ptr, A, ACT, BE, LINEAR)  # [1, BE]
    shared = blk < nbs
    e = tl.where(shared, -1, (blk - nbs) // nbe)
    j0 = tl.where(shared, blk, (blk - nbs) % nbe) * BM
    width = tl.where(shared, ms, m)
    g0 = tl.where(shared, 0, 2 * ms + e * (2 * m)) + j0
    u0 = g0 + width
    offs = tl.arange(0, BM)
    ok = j0 + offs < width
    gp = tl.where(g0 < split, ga_ptr + t * lda + g0, gb_ptr + t * ldb + (g0 - split))
    up = tl.where(u0 < split, ga_ptr + t * lda + u0, gb_ptr + t * ldb + (u0 - split))
    gv = tl.load(gp + offs, mask=ok).to(tl.float32)
    uv = tl.load(up + offs, mask=ok).to(tl.float32)
    w = tl.where(shared, 1.0, tl.sum(tl.sum(tl.where(offs_e[None, :] == e, wmat, 0.0), 1), 0))
    out = h_ptr + t * N + tl.where(shared, 0, ms + e * m) + j0 + offs
    tl.store(out, (te._act(gv, ACT) * uv * w).to(h_ptr.dtype.element_ty), mask=ok)


def glu_scores(gu, scores, router, ms, m, act, top_k, bm=1024, nw=4, h=None):
    ga, gb = gu
    T, split = ga.shape
    N = (split + gb.shape[1]) // 2
    E = (N - ms) // m
    _, _, bias, scale, linear = router
    if h is None:
        h = torch.empty(T, N, device=ga.device, dtype=ga.dtype)
    be = triton.next_power_of_2(max(E, 2))
    nbs, nbe = triton.cdiv(ms, bm), triton.cdiv(m, bm)
    if T:
        _glu_scores[(T, nbs + E * nbe)](ga, gb, scores, bias, scale, h, ms, m, E, N, split, ga.stride(0), gb.stride(0),
                                        nbs, nbe, A=top_k, ACT=te._ACT_CODE[act], LINEAR=linear, BE=be, BM=bm, num_warps=nw)
    return h


def router_rows(router):
    """[2E, d] (gate rows then up rows; linear: [E, d])."""
    rg, ru, _, _, linear = router
    return rg if linear else torch.cat([rg, ru])


def route_scores(x, rows):
    """The router's raw scores in float32 through cuBLAS: x [T, d] @ rows.T (bf16 products, float32 out)."""
    if x.is_cuda:
        return torch.mm(x, rows.T, out_dtype=torch.float32)
    return x.float() @ rows.float().T


_SIDE = {}


def packed_layer_scores(x, G, D, router, rows, ms, m, act, top_k, beside=False, bm=1024, nw=4):
    E = (D.shape[1] - ms) // m
    cut = packed_split(ms, m, E)
    if beside:
        main = torch.cuda.current_stream()
        side = _SIDE.setdefault("s", torch.cuda.Stream())
        side.wait_stream(main)
        with torch.cuda.stream(side):
            s = route_scores(x, rows)
        gu = (x @ G[:cut].T, x @ G[cut:].T)
        main.wait_stream(side)
        s.record_stream(main)
    else:
        s = route_scores(x, rows)
        gu = (x @ G[:cut].T, x @ G[cut:].T)
    return glu_scores(gu, s, router, ms, m, act, top_k, bm=bm, nw=nw) @ D.T
