"""Prototype (session 11, not measured yet): the decode GEMV path in ONE kernel.

Today the GEMV path (T * a <= 4 pairs) is two kernels: ``_gemv_gate_up`` writes h [P, m] (fp32),
``_gemv_down`` reads it and the selected experts' down rows. Here each program takes one block of
BN neurons of one (token, virtual expert) pair, computes h for them over all of d (the gate/up
rows), then multiplies h by those neurons' down columns, d rows at a time in blocks of BD, and adds
the result into a float32 output with atomics. One launch instead of two, and no h round trip;
the down weights are read as BN-wide column strips of [d, m].

    TRITON_INTERPRET=1 python fused_gemv.py check     # CPU: against the loop oracle
    python fused_gemv.py time                        # H200: per layer, against the two-kernel GEMV

Run from the repo root with PYTHONPATH=src.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from cmoe import triton_experts as te
from cmoe.experts import loop_experts, shared_expert


@triton.jit
def _gemv_fused(
    x_ptr, idx_ptr, wt_ptr, w_ptr, sw_ptr, wd_ptr, sd_ptr, out_ptr,  # out [T, d] float32, zeroed
    d, m, ms,
    A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)  # (token, slot) pair
    t = p // (S + A)
    slot = p % (S + A)
    offs_n = pid_n * BN + tl.arange(0, BN)
    e = slot.to(tl.int64)
    rw = tl.full((), 1.0, tl.float32)
    if slot >= S:
        e = tl.load(idx_ptr + t * A + slot - S).to(tl.int64) + S
        rw = tl.load(wt_ptr + t * A + slot - S).to(tl.float32)
    wg, up, n_ok = te._gate_up_rows(w_ptr, sw_ptr, e, offs_n, d, m, ms, S)
    wg = wg[:, None]
    wu = wg + up
    acc_g = tl.zeros((BN, BK), tl.float32)
    acc_u = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d
        xk = tl.load(x_ptr + t * d + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mk = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(wg + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
        acc_u += tl.load(wu + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
    h = te._act(tl.sum(acc_g, 1), ACT) * tl.sum(acc_u, 1) * rw  # [BN]; 0 where the neuron does not exist
    for r0 in range(0, d, BD):
        rows = r0 + tl.arange(0, BD)
        r_ok = rows < d
        wd, k_end = te._down_rows(wd_ptr, sd_ptr, e, rows, d, m, ms, S)  # [BD] pointers to column 0 of each row
        blk = tl.load(wd[:, None] + offs_n[None, :], mask=r_ok[:, None] & (offs_n < k_end)[None, :], other=0.0,
                      eviction_policy="evict_first").to(tl.float32)  # [BD, BN]
        tl.atomic_add(out_ptr + t * d + rows, tl.sum(blk * h[None, :], 1), mask=r_ok)


def fused_gemv_experts(x, idx, weight, gate_up, down, act: str, shared=None, cfg=(8, 512, 128, 4)) -> torch.Tensor:
    T, a = idx.shape
    d, m = x.shape[1], down.shape[2]
    ms, S = te._shared_pieces(shared, m)
    sgu, sd = shared if S else (gate_up, down)
    P = T * (S + a)
    out = torch.zeros(T, d, device=x.device, dtype=torch.float32)
    bn, bk, bd, nw = cfg
    if not te._INTERPRET:
        bn = te._gemv_bn(bn, m, P)
    _gemv_fused[(triton.cdiv(m, bn), P)](x, idx, weight.float(), gate_up, sgu, down, sd, out, d, m, ms,
                                         A=a, S=S, ACT=te._ACT_CODE[act], BN=bn, BK=bk, BD=bd, num_warps=nw)
    return out.to(x.dtype)


def case(T, a, E, m, ms, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device=device, dtype=dtype)  # noqa: E731
    x = r(T, d) * 20
    gu, dn = r(E, 2 * m, d), r(E, d, m)
    shared = (r(2 * ms, d), r(d, ms)) if ms else None
    idx = torch.stack([torch.randperm(E, generator=g)[:a] for _ in range(T)]).to(device)
    wt = (torch.rand(T, a, generator=g) + 0.5).to(device)
    return x, idx, wt, gu, dn, shared


def check() -> None:
    worst = 0.0
    for T, a, E, m, ms, d, act in [(1, 1, 7, 24, 24, 40, "silu"), (1, 2, 6, 20, 40, 33, "gelu_tanh"), (2, 2, 5, 16, 0, 48, "silu"),
                                   (4, 1, 3, 17, 30, 35, "relu"), (1, 3, 5, 19, 7, 64, "gelu")]:
        x, idx, wt, gu, dn, shared = case(T, a, E, m, ms, d, torch.float32, "cpu")
        ref = loop_experts(x, idx, wt, gu, dn, act)
        if shared:
            ref = ref + shared_expert(x, *shared, act)
        out = fused_gemv_experts(x, idx, wt, gu, dn, act, shared, cfg=(16, 32, 16, 4))
        err = ((out - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        print(f"T={T} a={a} E={E} m={m} ms={ms} d={d} {act}: rel err {err:.1e}")
    assert worst < 1e-5, worst
    print("ok")


def time_layers() -> None:
    from bench_experts import graph_ms  # benchmarks/ on PYTHONPATH

    d, f = 4096, 11008
    print(torch.cuda.get_device_name())
    for name, shared_pieces, a, pieces in [("S2A2E8", 2, 2, 8), ("S1A1E8", 1, 1, 8), ("S3A3E8", 3, 3, 8), ("S2A2E16", 2, 2, 16)]:
        m = f // pieces
        E, ms = pieces - shared_pieces, shared_pieces * m
        layers = [case(1, a, E, m, ms, d, torch.bfloat16, "cuda", seed=i) for i in range(4)]
        nbytes = (shared_pieces + a) * 3 * m * d * 2
        ref = te._gemv_experts(*layers[0][:5], "silu", shared=layers[0][5])
        base = graph_ms(lambda: [te._gemv_experts(*L[:5], "silu", shared=L[5]) for L in layers]) / 4
        print(f"{name}: two kernels {base * 1e3:.1f} us/layer ({nbytes / base / 1e9:.0f} GB/s)")
        for cfg in [(bn, 512, bd, nw) for bn in (4, 8, 16) for bd in (64, 128, 256) for nw in (4, 8)]:  # 18 compiles per config
            out = fused_gemv_experts(*layers[0][:5], "silu", layers[0][5], cfg=cfg)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t = graph_ms(lambda: [fused_gemv_experts(*L[:5], "silu", L[5], cfg=cfg) for L in layers]) / 4
            print(f"  fused {cfg}: {t * 1e3:.1f} us/layer ({nbytes / t / 1e9:.0f} GB/s, {base / t:.2f}x), rel err {err:.1e}")


if __name__ == "__main__":
    check() if sys.argv[1:] == ["check"] else time_layers()
