"""Routed experts at 1x2048 through cuBLAS's batched GEMM with a fixed capacity of C rows per expert,
against the library's Triton grouped kernels (align + gate/up + down), one layer alone.

cap C: gather x's rows into [E, C, d] (index_copy; pairs past C would go to a fallback, none here),
torch.bmm gate/up, glu, torch.bmm down. Rates over the useful FLOPs.
"""
import sys
import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te


def bench(fn):
    return min(do_bench(fn, warmup=30, rep=250) for _ in range(2)) * 1e3


def main(shape, cfg_name, T=2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    n_all, S, a = {"S1A1E8": (8, 1, 1), "S2A2E16": (16, 2, 2)}[cfg_name]
    m = f // n_all
    E = n_all - S
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    gate_up = torch.randn(E, 2 * m, d, device=dev, dtype=torch.bfloat16) * 0.02
    down = torch.randn(E, d, m, device=dev, dtype=torch.bfloat16) * 0.02
    idx = torch.stack([torch.randperm(E, device=dev)[:a] for _ in range(T)]).to(torch.int32)
    wt = torch.rand(T, a, device=dev, dtype=torch.float32)
    P = T * a
    counts = torch.bincount(idx.view(-1), minlength=E)
    useful = 2 * P * d * 3 * m
    print(f"## {shape} {cfg_name} T={T} m={m} E={E} a={a}: rows per expert mean {P / E:.0f}, max {int(counts.max())}")

    def line(name, us, flops=useful):
        print(f"{name:50s} {us:8.1f} us  {flops / us / 1e6:6.0f} TFLOP/s useful")

    def cur():
        return te._grouped_experts(x, idx, wt, gate_up, down, "silu")
    line("triton grouped (align + gate/up + down)", bench(cur))
    tokens, ends, pos = te.sort_pairs(idx, E)
    line("sort_pairs", bench(lambda: te.sort_pairs(idx, E)), 0)
    start = ends - counts.to(ends.dtype)
    for C in sorted({int(counts.max()), 320, 336, 384, 512}):
        if C < int(counts.max()):
            continue
        # each sorted row i (a pair of token tokens[i], expert e(i)) goes to row e*C + (i - start[e])
        e_of = torch.repeat_interleave(torch.arange(E, device=dev), counts)
        dest = e_of * C + (torch.arange(P, device=dev) - start.long()[e_of])
        xs = torch.empty(E * C + 1, d, device=dev, dtype=torch.bfloat16)

        def gather():
            xs.index_copy_(0, dest, x.index_select(0, tokens.long()))
        gu_w = gate_up.transpose(1, 2)
        dn_w = down.transpose(1, 2)
        xv = xs[: E * C].view(E, C, d)

        def gu_mm():
            return torch.bmm(xv, gu_w)
        gu = gu_mm()

        def act():
            return te.glu(gu.view(E * C, 2 * m), "silu")
        h = act().view(E, C, m)

        def dn_mm():
            return torch.bmm(h, dn_w)
        t_g, t_gu, t_act, t_dn = bench(gather), bench(gu_mm), bench(act), bench(dn_mm)
        line(f"cap C={C}: gather", t_g, 0)
        line(f"cap C={C}: bmm gate/up", t_gu, 2 * P * d * 2 * m)
        line(f"cap C={C}: glu", t_act, 0)
        line(f"cap C={C}: bmm down", t_dn, 2 * P * d * m)

        def whole():
            gather()
            g2 = torch.bmm(xv, gu_w)
            h2 = te.glu(g2.view(E * C, 2 * m), "silu").view(E, C, m)
            return torch.bmm(h2, dn_w)
        line(f"cap C={C}: gather+bmm+glu+bmm", bench(whole))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            whole()
        line(f"cap C={C}: same, CUDA graph", bench(g.replay))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cur()
    line("triton grouped, CUDA graph", bench(g.replay))


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for shape in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(shape, c)
