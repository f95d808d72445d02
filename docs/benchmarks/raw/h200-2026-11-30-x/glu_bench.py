"""Session 19: the dense path's pieces at decode b=128/256 (llama2-7b S3A3E8 shapes, bf16), each
alone in a CUDA graph (triton.testing.do_bench_cudagraph), against dense's FFN pieces: where do
the 25 us per step (4 layers) that run w measured come from?"""
import torch
from triton.testing import do_bench_cudagraph as bench

from cmoe import triton_experts as te

torch.manual_seed(0)
d, f, E_all = 4096, 11008, 8
m = f // E_all
for cfg, (S, A) in {"S3A3E8": (3, 3), "S2A2E8": (2, 2)}.items():
    E = E_all - S
    ms = S * m
    for T in (128, 256):
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
        down = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
        sgu = torch.randn(2 * ms, d, device="cuda", dtype=torch.bfloat16) * 0.02
        sd = torch.randn(d, ms, device="cuda", dtype=torch.bfloat16) * 0.02
        wgu = torch.randn(2 * f, d, device="cuda", dtype=torch.bfloat16) * 0.02
        wd = torch.randn(d, f, device="cuda", dtype=torch.bfloat16) * 0.02
        idx = torch.stack([torch.randperm(E, device="cuda")[:A] for _ in range(T)])
        wt = torch.rand(T, A, device="cuda")
        gu = x @ gate_up.view(E * 2 * m, d).T
        h = te.glu(gu.view(T * E, 2 * m), "silu", routing=(idx, wt)).view(T, E, m)
        sgu_out = x @ sgu.T
        y = torch.bmm(h.transpose(0, 1), down.transpose(1, 2))
        extra = te.glu(sgu_out, "silu") @ sd.T
        dgu = x @ wgu.T
        rows = {
            "moe gu GEMM": lambda: x @ gate_up.view(E * 2 * m, d).T,
            "moe glu (routed)": lambda: te.glu(gu.view(T * E, 2 * m), "silu", routing=(idx, wt)),
            "moe down bmm": lambda: torch.bmm(h.transpose(0, 1), down.transpose(1, 2)),
            "moe sum_rows": lambda: te.sum_rows(y.view(E * T, d), E, extra=extra, by_slot=True),
            "shared gu GEMM": lambda: x @ sgu.T,
            "shared glu": lambda: te.glu(sgu_out, "silu"),
            "dense gu GEMM": lambda: x @ wgu.T,
            "dense silu*mul": lambda: torch.nn.functional.silu(dgu[:, :f]) * dgu[:, f:],
            "dense down GEMM": lambda: torch.empty(T, f, device="cuda", dtype=torch.bfloat16) @ wd.T,
        }
        for name, fn in rows.items():
            print(f"{cfg} T={T} {name}: {bench(fn, rep=50) * 1e3:.1f} us", flush=True)
