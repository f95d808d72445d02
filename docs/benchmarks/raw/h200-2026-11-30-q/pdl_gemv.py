"""Session 12 experiment: batch-1 GEMV with programmatic dependent launch (PDL).

Variants of the two GEMV kernels, 4 layers in one CUDA graph with a residual add between layers
and a kernel that writes the routing before each layer (as the router does):
  base   cmoe.triton_experts._gemv_experts
  pdl    the same kernels, launched with launch_pdl=True, griddepcontrol.wait before the first
         read of anything a previous kernel wrote, launch_dependents right after it
  pre    pdl + the first weight tile loaded before the wait where it needs no routing
         (shared slots of gate_up; the shared rows of down)
    PYTHONPATH=src:benchmarks python .carry/s12/pdl_gemv.py
"""
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from cmoe import triton_experts as te
from cmoe.experts import loop_experts, shared_expert


@triton.jit
def _wait(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _gu(x_ptr, idx_ptr, w_ptr, sw_ptr, h_ptr, d, m, ms,
        A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    t = p // (S + A)
    slot = p % (S + A)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k0 = tl.arange(0, BK)
    acc_g = tl.zeros((BN, BK), tl.float32)
    acc_u = tl.zeros((BN, BK), tl.float32)
    k_first = 0
    if PRE:
        if slot < S:  # a shared piece: its rows need no routing
            wg, up, n_ok = te._gate_up_rows(w_ptr, sw_ptr, slot, offs_n, d, m, ms, S)
            mk = n_ok[:, None] & (offs_k0 < d)[None, :]
            g0 = tl.load(wg[:, None] + offs_k0[None, :], mask=mk, other=0.0, eviction_policy="evict_first")
            u0 = tl.load(wg[:, None] + up + offs_k0[None, :], mask=mk, other=0.0, eviction_policy="evict_first")
            _wait(PDL)
            xk = tl.load(x_ptr + t * d + offs_k0, mask=offs_k0 < d, other=0.0).to(tl.float32)[None, :]
            acc_g += g0.to(tl.float32) * xk
            acc_u += u0.to(tl.float32) * xk
            k_first = BK
        else:
            _wait(PDL)
    else:
        _wait(PDL)
    e = slot.to(tl.int64)
    if slot >= S:
        e = tl.load(idx_ptr + t * A + slot - S).to(tl.int64) + S
    wg, up, n_ok = te._gate_up_rows(w_ptr, sw_ptr, e, offs_n, d, m, ms, S)
    wg = wg[:, None]
    wu = wg + up
    for k0 in range(k_first, d, BK):
        offs_k = k0 + offs_k0
        k_ok = offs_k < d
        xk = tl.load(x_ptr + t * d + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mk = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(wg + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
        acc_u += tl.load(wu + offs_k[None, :], mask=mk, other=0.0, eviction_policy="evict_first").to(tl.float32) * xk
    tl.store(h_ptr + p * m + offs_n, te._act(tl.sum(acc_g, 1), ACT) * tl.sum(acc_u, 1), mask=n_ok)


@triton.jit
def _dn(h_ptr, idx_ptr, wt_ptr, w_ptr, sd_ptr, out_ptr, d, m, ms,
        A: tl.constexpr, S: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    h_t = h_ptr + t * (S + A) * m
    acc = tl.zeros((BN, BK), tl.float32)
    offs_k0 = tl.arange(0, BK)
    k_first = 0
    if S > 0:
        ws = sd_ptr + offs_n[:, None].to(tl.int64) * ms
        if PRE:
            w0 = tl.load(ws + offs_k0[None, :], mask=n_ok[:, None] & (offs_k0 < ms)[None, :], other=0.0, eviction_policy="evict_first")
            _wait(PDL)
            hk = tl.load(h_t + offs_k0, mask=offs_k0 < ms, other=0.0)
            acc += w0.to(tl.float32) * hk[None, :]
            k_first = BK
        else:
            _wait(PDL)
        for k0 in range(k_first, ms, BK):
            offs_k = k0 + offs_k0
            k_ok = offs_k < ms
            hk = tl.load(h_t + offs_k, mask=k_ok, other=0.0)
            acc += tl.load(ws + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32) * hk[None, :]
    else:
        _wait(PDL)
    for k in tl.static_range(A):
        e = tl.load(idx_ptr + t * A + k).to(tl.int64)
        rw = tl.load(wt_ptr + t * A + k).to(tl.float32)
        wd = w_ptr + e * d * m + offs_n[:, None].to(tl.int64) * m
        for k0 in range(0, m, BK):
            offs_k = k0 + offs_k0
            k_ok = offs_k < m
            hk = tl.load(h_t + (S + k) * m + offs_k, mask=k_ok, other=0.0) * rw
            acc += tl.load(wd + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32) * hk[None, :]
    tl.store(out_ptr + t * d + offs_n, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=n_ok)


def pdl_gemv(x, idx, weight, gate_up, down, act, shared=None, pre=False, pdl=True, only=None):
    T, a = idx.shape
    d, m = x.shape[1], down.shape[2]
    ms, S = te._shared_pieces(shared, m)
    sgu, sd = shared if S else (gate_up, down)
    P = T * (S + a)
    h = torch.empty(P, m, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    interp = te._INTERPRET
    kw = {} if interp or not pdl else {"launch_pdl": True}
    bn, bk, nw = te.GEMV_CONFIG["gate_up"]
    bn = te._gemv_bn(bn, m, P) if not interp else 16
    bk = bk if not interp else 16
    if only != "down":
        _gu[(triton.cdiv(m, bn), P)](x, idx, gate_up, sgu, h, d, m, ms, A=a, S=S, ACT=te._ACT_CODE[act], BN=bn, BK=bk,
                                     PRE=pre, PDL=pdl and not interp, num_warps=nw, **kw)
    bn, bk, nw = te.GEMV_CONFIG["down"]
    bn = te._gemv_bn(bn, d, T) if not interp else 16
    bk = bk if not interp else 16
    if only != "gate_up":
        _dn[(triton.cdiv(d, bn), T)](h, idx, weight, down, sd, out, d, m, ms, A=a, S=S, BN=bn, BK=bk, PRE=pre, PDL=pdl and not interp, num_warps=nw, **kw)
    return out


def case(T, a, E, m, ms, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device=device, dtype=dtype)  # noqa: E731
    x = r(T, d) * 20
    gu, dn = r(E, 2 * m, d), r(E, d, m)
    shared = (r(2 * ms, d), r(d, ms)) if ms else None
    idx = torch.stack([torch.randperm(E, generator=g)[:a] for _ in range(T)]).to(device)
    wt = (torch.rand(T, a, generator=g) + 0.5).to(device)
    return x, idx, wt, gu, dn, shared


def check():
    for T, a, E, m, ms, d, act in [(1, 1, 7, 24, 24, 40, "silu"), (1, 2, 6, 20, 40, 33, "gelu_tanh"), (2, 2, 5, 16, 0, 48, "silu"),
                                   (4, 1, 3, 17, 30, 35, "relu")]:
        x, idx, wt, gu, dn, shared = case(T, a, E, m, ms, d, torch.float32, "cpu")
        ref = loop_experts(x, idx, wt, gu, dn, act) + (shared_expert(x, *shared, act) if shared else 0)
        for pre in (False, True):
            out = pdl_gemv(x, idx, wt, gu, dn, act, shared, pre=pre)
            err = ((out - ref).norm() / ref.norm()).item()
            print(T, a, E, m, ms, d, act, pre, f"{err:.1e}")
            assert err < 1e-5


def time_layers():
    from bench_experts import graph_ms

    d, f = 4096, 11008
    print(torch.cuda.get_device_name(), flush=True)
    for name, sp, a, pieces in [("S2A2E8", 2, 2, 8), ("S1A1E8", 1, 1, 8), ("S3A3E8", 3, 3, 8), ("S2A2E16", 2, 2, 16)]:
        m = f // pieces
        E, ms = pieces - sp, sp * m
        layers = [case(1, a, E, m, ms, d, torch.bfloat16, "cuda", seed=i) for i in range(4)]
        idx_src = [L[1].clone() for L in layers]
        nbytes = (sp + a) * 3 * m * d * 2
        x0 = layers[0][0].clone()

        def step(fn):
            x = x0.clone()
            for L, src in zip(layers, idx_src):
                L[1].copy_(src)  # a kernel writes the routing, as the router does
                x = x + fn(x, L)
            return x

        variants = {
            "base": lambda x, L: te._gemv_experts(x, *L[1:5], "silu", shared=L[5]),
            "pdl": lambda x, L: pdl_gemv(x, *L[1:5], "silu", L[5]),
            "pre": lambda x, L: pdl_gemv(x, *L[1:5], "silu", L[5], pre=True),
            "nopdl": lambda x, L: pdl_gemv(x, *L[1:5], "silu", L[5], pdl=False),
            "base_gate_up_only": lambda x, L: pdl_gemv(x, *L[1:5], "silu", L[5], pdl=False, only="gate_up"),
            "base_down_only": lambda x, L: pdl_gemv(x, *L[1:5], "silu", L[5], pdl=False, only="down"),
        }
        ref = step(variants["base"])
        empty = graph_ms(lambda: step(lambda x, L: x * 0))  # the adds and copies alone
        res = {}
        for v, fn in variants.items():
            out = step(fn)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            res[v] = (graph_ms(lambda: step(fn)) - empty) / 4
            print(f"{name} {v:18s} {res[v] * 1e3:6.1f} us/layer  {nbytes / res[v] / 1e9:6.0f} GB/s  err {err:.1e}", flush=True)
        for rnd in range(2):  # again, alternating, for the spread
            print(f"{name} round {rnd}: " + ", ".join(
                f"{v} {(graph_ms(lambda: step(variants[v])) - empty) / 4 * 1e3:.1f}" for v in ("base", "pdl", "pre")), flush=True)
        w = torch.randn(nbytes // (2 * d), d, device="cuda", dtype=torch.bfloat16)
        xv = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        t = graph_ms(lambda: [xv @ w.T for _ in range(4)]) / 4
        print(f"{name} cuBLAS GEMV of the same bytes: {t * 1e3:.1f} us ({nbytes / t / 1e9:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    check() if sys.argv[1:] == ["check"] else time_layers()
