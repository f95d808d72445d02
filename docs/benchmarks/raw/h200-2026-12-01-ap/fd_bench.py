"""Session 37: the two-launch dense path (fd) against dense's FFN and the current dense path op, one layer
in a CUDA graph over 4 copies (weights from HBM), us per layer; tile sweeps on llama2-7b S3A3E8 first."""
import itertools
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s37")
from bench_experts import SHAPES, graph_ms, make_moe  # noqa: E402
import fd  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

COPIES = 4


@torch.compile
def silu_mul(g, u):
    return F.silu(g) * u


def t_us(fn):
    return graph_ms(fn) * 1e3 / COPIES


def setup(shape, preset, T):
    d, f = SHAPES[shape]
    torch.manual_seed(0)
    mods = [make_moe(d, f, preset) for _ in range(COPIES)]
    xs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    dense = [(torch.randn(f, d, **bf) * 0.02, torch.randn(f, d, **bf) * 0.02, torch.randn(d, f, **bf) * 0.02) for _ in range(COPIES)]
    return mods, xs, dense


def args_of(mod):
    return te.layer_args(mod)


def run_fd(mod, x, cfg, summed=True):
    a = args_of(mod)
    out = fd.fd_moe(x, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], cfg)
    return out.sum(1) if summed else out


def case(shape, preset, T, cfgs, label):
    mods, xs, dense = setup(shape, preset, T)
    x, mod = xs[0], mods[0]
    ref = te.triton_dense_op(x, *args_of(mod))
    with torch.no_grad():
        oracle = mod.forward_reference(x)
    res = {}

    def dense_ffn():
        for x, (w1, w3, w2) in zip(xs, dense):
            silu_mul(x @ w1.T, x @ w3.T) @ w2.T

    def op():
        for x, m in zip(xs, mods):
            te.triton_dense_op(x, *args_of(m))

    dn = t_us(dense_ffn)
    cur = t_us(op)
    print(f"## {label} {shape} {preset} T={T}: dense FFN {dn:.1f} us, current dense op {cur:.1f} us "
          f"(+{cur - dn:.1f})", flush=True)
    best = None
    for cfg in cfgs:
        try:
            out = run_fd(mod, x, cfg)
            torch.cuda.synchronize()
            err = ((out.float() - oracle.float()).abs().max() / oracle.float().abs().max()).item()
            err_op = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

            def go():
                for x, m in zip(xs, mods):
                    run_fd(m, x, cfg)

            def go_ns():
                for x, m in zip(xs, mods):
                    run_fd(m, x, cfg, summed=False)

            t = t_us(go)
            tn = t_us(go_ns)
        except Exception as e:  # noqa: BLE001
            print(f"fd {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        print(f"fd {cfg}: {t:7.1f} us (+{t - dn:5.1f} over dense), without the sum {tn:7.1f} (+{tn - dn:5.1f}); "
              f"err vs oracle {err:.1e}, vs op {err_op:.1e}", flush=True)
        if best is None or tn < best[0]:
            best = (tn, cfg)
    return best, dn, cur


def parts():
    """The pieces alone: llama2-7b S3A3E8, the best tiles of call 1."""
    best = {128: dict(fd.DEFAULT, bt=128, gate_up=(128, 64, 8, 4), down=(128, 64, 4, 3), groups=8),
            256: dict(fd.DEFAULT, bt=128, gate_up=(64, 64, 8, 3), down=(128, 64, 4, 3), groups=4)}
    for shape in ("llama2-7b", "llama3-8b"):
        for T, cfg in best.items():
            mods, xs, dense = setup(shape, "S3A3E8", T)
            packed = [torch.cat([w1, w3]) for w1, w3, _ in dense]
            hs = [run_fd(m, x, cfg, summed=False) for m, x in zip(mods, xs)]
            hs = [fd.fd_moe(x, *args_of(m), cfg, only="gate_up") for m, x in zip(mods, xs)]
            g = [x @ w1.T for x, (w1, _, _) in zip(xs, dense)]
            hd = [silu_mul(a, a) for a in g]
            r = {}
            r["dense gate + up GEMMs (cuBLAS)"] = t_us(lambda: [(x @ w1.T, x @ w3.T) for x, (w1, w3, _) in zip(xs, dense)])
            r["dense packed gate/up GEMM (cuBLAS, one)"] = t_us(lambda: [x @ w.T for x, w in zip(xs, packed)])
            r["dense silu*mul (inductor)"] = t_us(lambda: [silu_mul(a, a) for a in g])
            r["dense down GEMM (cuBLAS)"] = t_us(lambda: [h @ w2.T for h, (_, _, w2) in zip(hd, dense)])
            r["fd both launches"] = t_us(lambda: [run_fd(m, x, cfg, summed=False) for m, x in zip(mods, xs)])
            r["fd down launch alone"] = t_us(lambda: [fd.fd_moe(x, *args_of(m), cfg, only=h) for m, x, h in zip(mods, xs, hs)])
            r["current dense op"] = t_us(lambda: [te.triton_dense_op(x, *args_of(m)) for m, x in zip(mods, xs)])
            print(f"## parts {shape} S3A3E8 T={T} {cfg}", flush=True)
            for k, v in r.items():
                print(f"{k:45s} {v:7.1f} us", flush=True)
            print(f"{'fd gate/up launch (both - down alone)':45s} {r['fd both launches'] - r['fd down launch alone']:7.1f} us", flush=True)


def main():
    t0 = time.time()
    base = dict(fd.DEFAULT)
    gate_up = [dict(base, bt=bt, gate_up=(bn, bk, nw, ns))
               for bt, bn, bk, (nw, ns) in itertools.product((64, 128), (32, 64, 128), (64, 128), ((4, 3), (4, 4), (8, 3), (8, 4)))]
    which = sys.argv[1] if len(sys.argv) > 1 else "sweep"
    if which == "sweep":
        for T in (128, 256):
            best, _, _ = case("llama2-7b", "S3A3E8", T, gate_up, "gate/up sweep")
            print("BEST gate/up", T, best, flush=True)
            g = best[1]
            downs = [dict(g, down=(bn, bk, nw, ns), groups=gr)
                     for gr, bn, bk, (nw, ns) in itertools.product((2, 4, 8), (64, 128), (64, 128), ((4, 3), (4, 4), (8, 3)))]
            best, _, _ = case("llama2-7b", "S3A3E8", T, downs, "down sweep")
            print("BEST down", T, best, flush=True)
            print(f"[{time.time() - t0:.0f} s]", flush=True)
    elif which == "parts":
        parts()
    else:
        import json
        cfgs = json.loads(which)
        for shape in ("llama2-7b", "llama3-8b"):
            for preset in ("S3A3E8", "S2A2E8"):
                for T in (128, 256):
                    case(shape, preset, T, cfgs[str(T)], "final")
        print(f"[{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
