"""Session 38: at decode b=128/256 (the three llama2-7b misses), one layer of shared + routed experts as
CUTLASS pointer-array grouped GEMMs (the shared expert as group 0, its A being x itself; the routed
experts' gathered rows as groups 1..E), against dense's FFN (cuBLAS) and the current dense path op.
One layer in a CUDA graph over 4 copies (weights from HBM), us per layer."""
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s38/cg")
from bench_experts import SHAPES, graph_ms, make_moe  # noqa: E402
import cgpatch  # noqa: E402
from cg_bench import CONFIGS  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

COPIES = 4
ALL = CONFIGS + ["ping_64x128_c1", "coop_128x64_c1", "ping_64x64_c1"]


@torch.compile
def silu_mul(g, u):
    return F.silu(g) * u


def t_us(fn):
    return graph_ms(fn) * 1e3 / COPIES


def fold_layer(mod, x, c1, c2):
    """The whole layer: router, sort, gather, grouped gate/up (shared + routed), activation, grouped down, sum."""
    gu_w, dn_w, sgu, sd, rg, ru, bias, scale, linear, act, a = te.layer_args(mod)
    idx, wt, _ = te.triton_route_op(x, rg, ru, bias, scale, act, a, linear)
    tokens, ends, pos = te.sort_pairs(idx, gu_w.shape[0])
    g0, g = cgpatch.fold_mm(x, sgu, x.index_select(0, tokens), gu_w, ends, c1)
    y0, rows = cgpatch.fold_mm(te.glu(g0, act), sd, te.glu(g, act), dn_w, ends, c2)
    return te.sum_rows(rows, a, pos, wt, y0)


def case(shape, preset, T):
    d, f = SHAPES[shape]
    torch.manual_seed(0)
    mods = [make_moe(d, f, preset) for _ in range(COPIES)]
    xs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    dense = [(torch.randn(f, d, **bf) * 0.02, torch.randn(f, d, **bf) * 0.02, torch.randn(d, f, **bf) * 0.02)
             for _ in range(COPIES)]
    x, mod = xs[0], mods[0]
    with torch.no_grad():
        oracle = mod.forward_reference(x)
    dn = t_us(lambda: [silu_mul(x @ w1.T, x @ w3.T) @ w2.T for x, (w1, w3, w2) in zip(xs, dense)])
    dgu = t_us(lambda: [(x @ w1.T, x @ w3.T) for x, (w1, w3, _) in zip(xs, dense)])
    hd = [torch.randn(T, f, **bf) for _ in range(COPIES)]
    ddn = t_us(lambda: [h @ w2.T for h, (_, _, w2) in zip(hd, dense)])
    cur = t_us(lambda: [te.triton_dense_op(x, *te.layer_args(m)) for x, m in zip(xs, mods)])
    print(f"## {shape} {preset} T={T}: dense FFN {dn:.1f} us (gate+up {dgu:.1f}, down {ddn:.1f}), "
          f"current dense op {cur:.1f} (+{cur - dn:.1f})", flush=True)
    # the pieces' inputs, per copy
    pre = []
    for x, m in zip(xs, mods):
        gu_w, dn_w, sgu, sd, rg, ru, bias, scale, linear, act, a = te.layer_args(m)
        idx, wt, _ = te.triton_route_op(x, rg, ru, bias, scale, act, a, linear)
        tokens, ends, pos = te.sort_pairs(idx, gu_w.shape[0])
        xg = x.index_select(0, tokens)
        pre.append((x, sgu, xg, gu_w, ends, sd, dn_w, idx, wt, tokens, pos))
    counts = torch.diff(pre[0][4], prepend=pre[0][4].new_zeros(1)).tolist()
    print(f"rows per routed expert {counts}", flush=True)
    best = {}
    for which in ("gate/up", "down"):
        for c in ALL:
            try:
                if which == "gate/up":
                    fn = lambda: [cgpatch.fold_mm(x, sgu, xg, g, e, c) for x, sgu, xg, g, e, *_ in pre]  # noqa: E731
                    h = None
                else:
                    hs = [(torch.randn(T, sd.shape[1], **bf), torch.randn(xg.shape[0], dw.shape[2], **bf))
                          for x, sgu, xg, g, e, sd, dw, *_ in pre]
                    fn = lambda: [cgpatch.fold_mm(h0, p[5], h1, p[6], p[4], c) for (h0, h1), p in zip(hs, pre)]  # noqa: E731
                t = t_us(fn)
            except Exception as e:  # noqa: BLE001
                print(f"  {which} {c}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            print(f"  {which} {c}: {t:6.1f} us", flush=True)
            if which not in best or t < best[which][0]:
                best[which] = (t, c)
    c1, c2 = best["gate/up"][1], best["down"][1]
    out = fold_layer(mod, x, c1, c2)
    torch.cuda.synchronize()
    err = ((out.float() - oracle.float()).abs().max() / oracle.float().abs().max()).item()
    whole = t_us(lambda: [fold_layer(m, x, c1, c2) for x, m in zip(xs, mods)])
    ra = [te.layer_args(m) for m in mods]
    route = t_us(lambda: [te.triton_route_op(p[0], r[4], r[5], r[6], r[7], r[9], r[10], r[8]) for p, r in zip(pre, ra)])
    sort = t_us(lambda: [te.sort_pairs(p[7], p[3].shape[0]) for p in pre])
    gather = t_us(lambda: [p[0].index_select(0, p[9]) for p in pre])
    print(f"BEST {shape} {preset} T={T}: gate/up {best['gate/up']}, down {best['down']}; whole fold layer {whole:.1f} us "
          f"(+{whole - dn:.1f} over dense, current +{cur - dn:.1f}); err vs oracle {err:.1e}; router {route:.1f}, "
          f"sort {sort:.1f}, gather {gather:.1f}", flush=True)


def main():
    t0 = time.time()
    for shape in ("llama2-7b", "llama3-8b"):
        for preset in ("S3A3E8", "S2A2E8"):
            for T in (128, 256):
                case(shape, preset, T)
                print(f"[{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
