"""Session 12: tile sweep of the batch-1 GEMV kernels, each alone, 4 layers in one CUDA graph.
    PYTHONPATH=src:benchmarks:.carry/s12 python .carry/s12/gemv_sweep.py
"""
import torch
import triton

from bench_experts import graph_ms
from cmoe import triton_experts as te
from pdl_gemv import _dn, _gu, case

d, f = 4096, 11008
print(torch.cuda.get_device_name(), flush=True)
for name, sp, a, pieces in [("S2A2E8", 2, 2, 8)]:
    m = f // pieces
    E, ms = pieces - sp, sp * m
    S, P = sp, sp + a
    layers = [case(1, a, E, m, ms, d, torch.bfloat16, "cuda", seed=i) for i in range(4)]
    h = torch.randn(P, m, device="cuda")
    outs = [torch.empty(1, d, device="cuda", dtype=torch.bfloat16) for _ in layers]
    gu_bytes, dn_bytes = P * 2 * m * d * 2, P * m * d * 2
    for rows, nb in (("gate_up", gu_bytes), ("down", dn_bytes)):
        w = torch.randn(nb // (2 * d), d, device="cuda", dtype=torch.bfloat16)
        xv = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        t = graph_ms(lambda: [xv @ w.T for _ in range(4)]) / 4
        print(f"{name} cuBLAS, the bytes of {rows}: {t * 1e3:.1f} us ({nb / t / 1e6:.0f} GB/s)", flush=True)
        del w
    res = []
    for bn in (2, 4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            for nw in (2, 4, 8):
                if bn * bk > 16384:
                    continue
                def run():
                    for (x, idx, wt, gu, dn, sh) in layers:
                        _gu[(triton.cdiv(m, bn), P)](x, idx, gu, sh[0], h, d, m, ms, A=a, S=S, ACT=0, BN=bn, BK=bk,
                                                     PRE=False, PDL=False, num_warps=nw)
                t = graph_ms(run) / 4
                res.append((t, "gate_up", bn, bk, nw))
                print(f"{name} gate_up BN {bn:2d} BK {bk:4d} nw {nw}: {t * 1e3:5.1f} us ({gu_bytes / t / 1e6:.0f} GB/s)", flush=True)
    for bn in (2, 4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            for nw in (2, 4, 8):
                if bn * bk > 16384:
                    continue
                def run():
                    for (x, idx, wt, gu, dn, sh), o in zip(layers, outs):
                        _dn[(triton.cdiv(d, bn), 1)](h, idx, wt, dn, sh[1], o, d, m, ms, A=a, S=S, BN=bn, BK=bk,
                                                     PRE=False, PDL=False, num_warps=nw)
                t = graph_ms(run) / 4
                res.append((t, "down", bn, bk, nw))
                print(f"{name} down BN {bn:2d} BK {bk:4d} nw {nw}: {t * 1e3:5.1f} us ({dn_bytes / t / 1e6:.0f} GB/s)", flush=True)
    for k in ("gate_up", "down"):
        best = sorted(r for r in res if r[1] == k)[:3]
        print(f"{name} best {k}: " + "; ".join(f"BN {b} BK {c} nw {n}: {t * 1e3:.1f} us" for t, _, b, c, n in best), flush=True)
