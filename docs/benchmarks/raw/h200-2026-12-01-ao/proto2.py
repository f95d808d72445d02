"""Session 36, call 2: the packed dense path with the router's raw scores from one cuBLAS GEMM (bf16 in, float32 out),
first on the main stream or beside the gate/up GEMMs, and the routing finished inside the activation kernel; one layer
in a CUDA graph over 4 copies (weights from HBM), us per layer, against dense's FFN and the current dense path op."""
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s36")
from bench_experts import graph_ms  # noqa: E402
from glu_route import glu_scores, packed_layer_scores, packed_split, route_scores, router_rows  # noqa: E402
from proto_bench import layers, silu_mul  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

COPIES = 4


def t_us(fn):
    return graph_ms(fn) * 1e3 / COPIES


def main(model, d, f, cfg, T):
    S, a = {"S3A3E8": (3, 3), "S2A2E8": (2, 2)}[cfg]
    xs, L, m, E, ms = layers(d, f, S, a, T)
    for w in L:
        w["rows"] = router_rows(w["router"])
    print(f"## {model} {cfg} T={T}: E={E} routed of m={m}, shared {ms}, top-{a}", flush=True)
    x, w = xs[0], L[0]
    ref = te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)
    for beside in (False, True):
        out = packed_layer_scores(x, w["G"], w["D"], w["router"], w["rows"], ms, m, "silu", a, beside=beside)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(f"scores path (beside={beside}) vs current dense op: max rel err {err:.2e}", flush=True)
    idx, _, _ = te.triton_route_op(x, w["rg"], w["ru"], w["bias"], w["scale"], "silu", a, False)
    s = route_scores(x, w["rows"])
    p = torch.softmax((s[:, E:] * F.silu(s[:, :E])).abs(), -1)
    idx2 = p.topk(a, -1).indices
    same = (idx.sort(-1).values == idx2.sort(-1).values).all(-1).float().mean().item()
    print(f"top-{a} sets equal to the Triton router's: {same * 100:.2f} % of {T} tokens", flush=True)

    def dense_ffn():
        for x, w in zip(xs, L):
            (silu_mul(x @ w["w1"].T, x @ w["w3"].T)) @ w["w2"].T

    def moe_op():
        for x, w in zip(xs, L):
            te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)

    dense, op = t_us(dense_ffn), t_us(moe_op)
    print(f"dense FFN {dense:7.1f} us | current dense path op {op:7.1f} us", flush=True)
    print(f"router: Triton op {t_us(lambda: [te.triton_route_op(x, w['rg'], w['ru'], w['bias'], w['scale'], 'silu', a, False) for x, w in zip(xs, L)]):6.1f} us, "
          f"cuBLAS float32-out scores {t_us(lambda: [route_scores(x, w['rows']) for x, w in zip(xs, L)]):6.1f} us", flush=True)
    g1 = [x @ w["w1"].T for x, w in zip(xs, L)]
    g3 = [x @ w["w3"].T for x, w in zip(xs, L)]
    cut = packed_split(ms, m, E)
    gus = [(x @ w["G"][:cut].T, x @ w["G"][cut:].T) for x, w in zip(xs, L)]
    ss = [route_scores(x, w["rows"]) for x, w in zip(xs, L)]
    hbuf = torch.empty(T, ms + E * m, device="cuda", dtype=torch.bfloat16)
    line = f"activation: inductor silu*mul {t_us(lambda: [silu_mul(g, u) for g, u in zip(g1, g3)]):5.1f} us"
    for bm, nw in ((1024, 4), (512, 4), (2048, 8)):
        line += f" | glu_scores bm={bm} nw={nw} {t_us(lambda: [glu_scores(g, s, w['router'], ms, m, 'silu', a, bm=bm, nw=nw, h=hbuf) for g, s, w in zip(gus, ss, L)]):5.1f} us"
    print(line, flush=True)
    for bm, nw in ((1024, 4), (512, 4)):
        for beside in (False, True):
            t = t_us(lambda: [packed_layer_scores(x, w["G"], w["D"], w["router"], w["rows"], ms, m, "silu", a, beside=beside, bm=bm, nw=nw)
                              for x, w in zip(xs, L)])
            print(f"PACKED SCORES beside={beside} bm={bm} nw={nw}: {t:6.1f} us; vs dense {t - dense:+5.1f} us, vs current op {t - op:+5.1f} us", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), flush=True)
    for model, d, f in (("llama2-7b", 4096, 11008), ("llama3-8b", 4096, 14336)):
        for T in (128, 256):
            for c in ("S3A3E8", "S2A2E8"):
                main(model, d, f, c, T)
