"""Session 36, call 1: the packed dense path with the router in the activation kernel (prototype), against
dense's FFN and the current dense path op, one layer in a CUDA graph over 4 copies (weights from HBM), us per layer."""
import itertools
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s36")
from bench_experts import graph_ms  # noqa: E402
from glu_route import glu_route, pack, packed_layer, packed_split  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

COPIES = 4


@torch.compile
def silu_mul(g, u):
    return F.silu(g) * u


def t_us(fn):
    return graph_ms(fn) * 1e3 / COPIES


def layers(d, f, S, a, T):
    m = f // 8
    E, ms = 8 - S, S * m
    bf = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    xs = [torch.randn(T, d, **bf) for _ in range(COPIES)]
    L = []
    for _ in range(COPIES):
        w = dict(gu=torch.randn(E, 2 * m, d, **bf) * 0.02, dn=torch.randn(E, d, m, **bf) * 0.02,
                 sgu=torch.randn(2 * ms, d, **bf) * 0.02, sd=torch.randn(d, ms, **bf) * 0.02,
                 rg=torch.nn.functional.normalize(torch.randn(E, d, **bf), dim=1),
                 ru=torch.nn.functional.normalize(torch.randn(E, d, **bf), dim=1),
                 bias=torch.zeros(E, device="cuda"), scale=torch.zeros(E, device="cuda"),
                 w1=torch.randn(f, d, **bf) * 0.02, w3=torch.randn(f, d, **bf) * 0.02, w2=torch.randn(d, f, **bf) * 0.02)
        w["G"], w["D"] = pack(w["sgu"], w["gu"], w["sd"], w["dn"])
        w["router"] = (w["rg"], w["ru"], w["bias"], w["scale"], False)
        L.append(w)
    return xs, L, m, E, ms


def main(model, d, f, cfg, T, sweep):
    S, a = {"S3A3E8": (3, 3), "S2A2E8": (2, 2)}[cfg]
    xs, L, m, E, ms = layers(d, f, S, a, T)
    N = ms + E * m
    print(f"## {model} {cfg} T={T}: E={E} routed of m={m}, shared {ms}, top-{a}", flush=True)
    x, w = xs[0], L[0]
    ref = te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)
    out = packed_layer(x, w["G"], w["D"], w["router"], ms, m, "silu", a)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    print(f"packed prototype vs current dense op: max rel err {err:.2e}", flush=True)

    def dense_ffn():
        for x, w in zip(xs, L):
            (silu_mul(x @ w["w1"].T, x @ w["w3"].T)) @ w["w2"].T

    def moe_op():
        for x, w in zip(xs, L):
            te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)

    def route():
        for x, w in zip(xs, L):
            te.triton_route_op(x, w["rg"], w["ru"], w["bias"], w["scale"], "silu", a, False)

    res = {}
    res["dense"] = t_us(dense_ffn)
    res["op"] = t_us(moe_op)
    print(f"dense FFN (cuBLAS gate, up; inductor silu*mul; down) {res['dense']:7.1f} us", flush=True)
    print(f"current dense path op                                 {res['op']:7.1f} us", flush=True)
    print(f"router op alone                                       {t_us(route):7.1f} us", flush=True)
    g1 = [x @ w["w1"].T for x, w in zip(xs, L)]
    g3 = [x @ w["w3"].T for x, w in zip(xs, L)]
    print(f"inductor silu*mul [T, {f}]                        {t_us(lambda: [silu_mul(g, u) for g, u in zip(g1, g3)]):7.1f} us", flush=True)
    cut = packed_split(ms, m, E)
    print(f"GEMMs dense gate + up                 {t_us(lambda: [(x @ w['w1'].T, x @ w['w3'].T) for x, w in zip(xs, L)]):7.1f} us", flush=True)
    print(f"GEMMs packed, two (cut {cut} of {2 * N})  {t_us(lambda: [(x @ w['G'][:cut].T, x @ w['G'][cut:].T) for x, w in zip(xs, L)]):7.1f} us", flush=True)
    print(f"GEMM packed, one [T, {2 * N}]            {t_us(lambda: [x @ w['G'].T for x, w in zip(xs, L)]):7.1f} us", flush=True)
    print(f"GEMM down dense / packed              {t_us(lambda: [hh @ w['w2'].T for hh, w in zip(g1, L)]):7.1f} / "
          f"{t_us(lambda: [hh[:, :N] @ w['D'].T for hh, w in zip(g1, L)]):7.1f} us", flush=True)
    gus = [(x @ w["G"][:cut].T, x @ w["G"][cut:].T) for x, w in zip(xs, L)]
    hbuf = torch.empty(T, N, device="cuda", dtype=torch.bfloat16)
    ref_h = glu_route(gus[0], xs[0], L[0]["router"], ms, m, "silu", a)
    variants = list(itertools.product((1, 2, 4), (1, 2, 4), ((512, 1024, 4), (256, 512, 4), (512, 1024, 8)))) if sweep else [
        (kw["bt"], kw["q"], (kw["bk"], kw["bm"], kw["nw"])) for kw in sweep_best]
    timed = []
    for bt, q, (bk, bm, nw) in variants:
        kw = dict(bt=bt, q=q, bk=bk, bm=bm, nw=nw)
        hh = glu_route(gus[0], xs[0], L[0]["router"], ms, m, "silu", a, h=hbuf, **kw)
        eq = torch.equal(hh, ref_h)
        t = t_us(lambda: [glu_route(g, x, w["router"], ms, m, "silu", a, h=hbuf, **kw) for g, x, w in zip(gus, xs, L)])
        timed.append((t, kw))
        print(f"glu_route {kw}: {t:6.1f} us, equal to bt=1 default {eq}", flush=True)
    timed.sort(key=lambda r: r[0])
    best = [kw for _, kw in timed[:3]]
    if sweep:
        sweep_best[:] = best
    for kw in best:
        for two in (True, False):
            t = t_us(lambda: [packed_layer(x, w["G"], w["D"], w["router"], ms, m, "silu", a, two=two, **kw) for x, w in zip(xs, L)])
            print(f"PACKED LAYER two={two} {kw}: {t:6.1f} us; dense {res['dense']:.1f}, current op {res['op']:.1f}; "
                  f"vs dense {t - res['dense']:+.1f} us", flush=True)


sweep_best = []
if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), flush=True)
    first = True
    for model, d, f in (("llama2-7b", 4096, 11008), ("llama3-8b", 4096, 14336)):
        for T in (128, 256):
            for c in ("S3A3E8", "S2A2E8"):
                main(model, d, f, c, T, sweep=first or T == 256 and c == "S3A3E8" and model == "llama2-7b")
                first = False
