"""Session 35, call 5: the dense path's pieces at b=128/256 (llama2-7b S3A3E8, S2A2E8), each in a CUDA graph over
4 layer copies (weights from HBM), us per layer: the whole op against dense's FFN (its GEMMs and inductor's
SiLU-and-multiply), the router, the two activation passes (``glu``) and 2D-tiled variants, sum_rows, the GEMMs."""
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, "benchmarks")
from bench_experts import graph_ms  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

COPIES = 4


@triton.jit
def _glu_tiles(gu_ptr, h_ptr, idx_ptr, wt_ptr, R, m, E, A: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    ok = (rows < R)[:, None] & (cols < m)[None, :]
    base = gu_ptr + rows.to(tl.int64)[:, None] * 2 * m + cols[None, :]
    g = tl.load(base, mask=ok).to(tl.float32)
    u = tl.load(base + m, mask=ok).to(tl.float32)
    h = te._act(g, 0) * u
    if A > 0:
        t = rows // E
        e = rows % E
        w = tl.zeros((BR,), tl.float32)
        for k in tl.static_range(A):
            w += tl.where(tl.load(idx_ptr + t * A + k, mask=rows < R, other=-1) == e,
                          tl.load(wt_ptr + t * A + k, mask=rows < R, other=0.0), 0.0)
        h = h * w[:, None]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * m + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=ok)


def glu_tiles(gu, h, routing, br, bm, nw):
    R, m = gu.shape[0], gu.shape[1] // 2
    if routing is None:
        idx = wt = gu
        a, E = 0, 1
    else:
        idx, wt = routing
        a, E = idx.shape[1], R // idx.shape[0]
    _glu_tiles[(triton.cdiv(R, br), triton.cdiv(m, bm))](gu, h, idx, wt, R, m, E, A=a, BR=br, BM=bm, num_warps=nw)


@torch.compile
def silu_mul(g, u):
    return F.silu(g) * u


def t_us(fn):
    return graph_ms(fn) * 1e3 / COPIES


def main(T, cfg):
    d, f = 4096, 11008
    S, a = {"S3A3E8": (3, 3), "S2A2E8": (2, 2)}[cfg]
    m = f // 8
    E, ms = 8 - S, S * m
    bf = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    xs = [torch.randn(T, d, **bf) for _ in range(COPIES)]
    L = []
    for _ in range(COPIES):
        L.append(dict(gu=torch.randn(E, 2 * m, d, **bf) * 0.02, dn=torch.randn(E, d, m, **bf) * 0.02,
                      sgu=torch.randn(2 * ms, d, **bf) * 0.02, sd=torch.randn(d, ms, **bf) * 0.02,
                      rg=torch.randn(E, d, **bf) * 0.02, ru=torch.randn(E, d, **bf) * 0.02,
                      bias=torch.zeros(E, device="cuda"), scale=torch.zeros(E, device="cuda"),
                      w1=torch.randn(f, d, **bf) * 0.02, w3=torch.randn(f, d, **bf) * 0.02, w2=torch.randn(d, f, **bf) * 0.02))
    print(f"## llama2-7b {cfg} T={T}: E={E} routed of m={m}, shared {ms}, top-{a}", flush=True)

    def dense_ffn():
        for x, w in zip(xs, L):
            (silu_mul(x @ w["w1"].T, x @ w["w3"].T)) @ w["w2"].T

    def moe_op():
        for x, w in zip(xs, L):
            te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)

    def moe_op_serial():
        te.SHARED_STREAM = False
        try:
            moe_op()
        finally:
            te.SHARED_STREAM = True

    def route():
        for x, w in zip(xs, L):
            te.triton_route_op(x, w["rg"], w["ru"], w["bias"], w["scale"], "silu", a, False)

    print(f"dense FFN (2 GEMMs gate, up; inductor silu*mul; down) {t_us(dense_ffn):7.1f} us", flush=True)
    print(f"dense path op (second stream)                         {t_us(moe_op):7.1f} us", flush=True)
    print(f"dense path op (one stream)                            {t_us(moe_op_serial):7.1f} us", flush=True)
    print(f"router op                                             {t_us(route):7.1f} us", flush=True)
    idx, wt, _ = te.triton_route_op(xs[0], L[0]["rg"], L[0]["ru"], L[0]["bias"], L[0]["scale"], "silu", a, False)
    gus = [x @ w["gu"].view(E * 2 * m, d).T for x, w in zip(xs, L)]
    sgus = [x @ w["sgu"].T for x, w in zip(xs, L)]
    g1 = [x @ w["w1"].T for x, w in zip(xs, L)]
    g3 = [x @ w["w3"].T for x, w in zip(xs, L)]
    print(f"GEMM routed gate/up [T, {E * 2 * m}]  {t_us(lambda: [x @ w['gu'].view(E * 2 * m, d).T for x, w in zip(xs, L)]):7.1f} us", flush=True)
    print(f"GEMM shared gate/up [T, {2 * ms}]   {t_us(lambda: [x @ w['sgu'].T for x, w in zip(xs, L)]):7.1f} us", flush=True)
    print(f"GEMM dense gate + up 2x[T, {f}]  {t_us(lambda: [(x @ w['w1'].T, x @ w['w3'].T) for x, w in zip(xs, L)]):7.1f} us", flush=True)
    print(f"inductor silu*mul [T, {f}]         {t_us(lambda: [silu_mul(g, u) for g, u in zip(g1, g3)]):7.1f} us", flush=True)
    ref_r = te.glu(gus[0].view(T * E, 2 * m), "silu", routing=(idx, wt))
    ref_s = te.glu(sgus[0], "silu")
    print(f"glu routed (current) [{T * E}, {m}]  {t_us(lambda: [te.glu(g.view(T * E, 2 * m), 'silu', routing=(idx, wt)) for g in gus]):7.1f} us", flush=True)
    print(f"glu shared (current) [{T}, {ms}]   {t_us(lambda: [te.glu(g, 'silu') for g in sgus]):7.1f} us", flush=True)
    hr = torch.empty(T * E, m, **bf)
    hs = torch.empty(T, ms, **bf)
    for br, bm, nw in ((1, 1024, 4), (2, 512, 4), (4, 256, 4), (4, 512, 4), (8, 256, 4), (8, 512, 8), (16, 128, 4), (16, 256, 8)):
        glu_tiles(gus[0].view(T * E, 2 * m), hr, (idx, wt), br, bm, nw)
        glu_tiles(sgus[0], hs, None, br, bm, nw)
        ok = torch.equal(hr, ref_r) and torch.equal(hs, ref_s)
        tr = t_us(lambda: [glu_tiles(g.view(T * E, 2 * m), hr, (idx, wt), br, bm, nw) for g in gus])
        ts = t_us(lambda: [glu_tiles(g, hs, None, br, bm, nw) for g in sgus])
        print(f"glu tiles ({br}, {bm}, {nw}): routed {tr:6.1f} us, shared {ts:6.1f} us, equal {ok}", flush=True)
    y = torch.randn(E * T, d, **bf)
    ex = torch.randn(T, d, **bf)
    print(f"sum_rows                            {t_us(lambda: [te.sum_rows(y, E, extra=ex, by_slot=True) for _ in range(COPIES)]):7.1f} us", flush=True)
    h = torch.randn(T, E, m, **bf)
    print(f"bmm down [E, T, d]                  {t_us(lambda: [torch.bmm(h.transpose(0, 1), w['dn'].transpose(1, 2)) for w in L]):7.1f} us", flush=True)
    print(f"shared down [T, d]                  {t_us(lambda: [hs @ w['sd'].T for w in L]):7.1f} us", flush=True)
    hd = torch.randn(T, f, **bf)
    print(f"dense down [T, d]                   {t_us(lambda: [hd @ w['w2'].T for w in L]):7.1f} us", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for T in (128, 256):
        for c in ("S3A3E8", "S2A2E8"):
            main(T, c)
