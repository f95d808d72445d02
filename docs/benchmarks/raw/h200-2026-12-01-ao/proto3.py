"""Session 36, call 3: cuBLAS GEMMs of the dense path on two streams at once (at 128 tokens one GEMM of [T, 11008]
fills only some of the H200's SMs); the packed layer with the two halves of its gate/up GEMM side by side, the router's
float32 scores before the side half, the routing finished in the activation kernel; and down in two halves of K."""
import sys
import time

import torch
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s36")
from bench_experts import graph_ms  # noqa: E402
from glu_route import glu_scores, packed_split, route_scores, router_rows  # noqa: E402
from proto_bench import layers, silu_mul  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

COPIES = 4
SIDE = torch.cuda.Stream()


def t_us(fn):
    return graph_ms(fn) * 1e3 / COPIES


def both(f_main, f_side):
    """f_side() on the side stream beside f_main() on the current one; returns (main's, side's) results."""
    main = torch.cuda.current_stream()
    SIDE.wait_stream(main)
    with torch.cuda.stream(SIDE):
        b = f_side()
    a = f_main()
    main.wait_stream(SIDE)
    for t in (b if isinstance(b, tuple) else (b,)):
        t.record_stream(main)
    return a, b


def packed_two_stream(x, w, ms, m, a, cut, down_split=False):
    def side():
        s = route_scores(x, w["rows"])
        return s, x @ w["G"][cut:].T
    ga, (s, gb) = both(lambda: x @ w["G"][:cut].T, side)
    h = glu_scores((ga, gb), s, w["router"], ms, m, "silu", a)
    if not down_split:
        return h @ w["D"].T
    k = h.shape[1] // 2
    y1, y2 = both(lambda: h[:, :k] @ w["D"][:, :k].T, lambda: h[:, k:] @ w["D"][:, k:].T)
    return y1 + y2


def main(model, d, f, cfg, T):
    S, a = {"S3A3E8": (3, 3), "S2A2E8": (2, 2)}[cfg]
    xs, L, m, E, ms = layers(d, f, S, a, T)
    for w in L:
        w["rows"] = router_rows(w["router"])
    cut = packed_split(ms, m, E)
    print(f"## {model} {cfg} T={T}: E={E} routed of m={m}, shared {ms}, top-{a}", flush=True)
    x, w = xs[0], L[0]
    ref = te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)
    for ds in (False, True):
        out = packed_two_stream(x, w, ms, m, a, cut, ds)
        torch.cuda.synchronize()
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(f"two-stream packed (down split {ds}) vs current dense op: max rel err {err:.2e}", flush=True)

    def dense_ffn():
        for x, w in zip(xs, L):
            (silu_mul(x @ w["w1"].T, x @ w["w3"].T)) @ w["w2"].T

    def moe_op():
        for x, w in zip(xs, L):
            te.triton_dense_op(x, w["gu"], w["dn"], w["sgu"], w["sd"], w["rg"], w["ru"], w["bias"], w["scale"], False, "silu", a)

    dense, op = t_us(dense_ffn), t_us(moe_op)
    print(f"dense FFN {dense:7.1f} us | current dense path op {op:7.1f} us", flush=True)
    seq = t_us(lambda: [(x @ w["w1"].T, x @ w["w3"].T) for x, w in zip(xs, L)])
    par = t_us(lambda: [both(lambda: x @ w["w1"].T, lambda: x @ w["w3"].T) for x, w in zip(xs, L)])
    print(f"dense gate + up GEMMs: one stream {seq:6.1f} us, two streams {par:6.1f} us", flush=True)
    hs = [torch.randn(T, f, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
    k = f // 2
    seq = t_us(lambda: [h @ w["w2"].T for h, w in zip(hs, L)])
    par = t_us(lambda: [both(lambda: h[:, :k] @ w["w2"][:, :k].T, lambda: h[:, k:] @ w["w2"][:, k:].T) for h, w in zip(hs, L)])
    par_add = t_us(lambda: [sum(both(lambda: h[:, :k] @ w["w2"][:, :k].T, lambda: h[:, k:] @ w["w2"][:, k:].T)) for h, w in zip(hs, L)])
    print(f"down GEMM [T, {f}] -> [T, {d}]: one {seq:6.1f} us, two K halves on two streams {par:6.1f} us, with their sum {par_add:6.1f} us", flush=True)
    for ds in (False, True):
        t = t_us(lambda: [packed_two_stream(x, w, ms, m, a, cut, ds) for x, w in zip(xs, L)])
        print(f"PACKED TWO-STREAM down_split={ds}: {t:6.1f} us; vs dense {t - dense:+5.1f} us, vs current op {t - op:+5.1f} us", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), flush=True)
    for model, d, f in (("llama2-7b", 4096, 11008), ("llama3-8b", 4096, 14336)):
        for T in (128, 256):
            for c in ("S3A3E8", "S2A2E8"):
                main(model, d, f, c, T)
