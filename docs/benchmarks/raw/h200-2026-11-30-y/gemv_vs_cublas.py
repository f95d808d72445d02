"""Session 20: batch 1, the MoE layer's GEMV op against cuBLAS reading the same bytes. Each in a
CUDA graph (triton.testing.do_bench_cudagraph), alone. Rows:
- cuBLAS GEMV (F.linear, one token) over weight matrices of 11-360 MB: the rate per size;
- the GEMV op of one S1A1E8 / S2A2E16 layer (llama2-7b, llama3-8b shapes: router, shared and one or two
  routed experts) against cuBLAS doing the same two GEMVs on the same bytes (x @ [gate; up]^T, then
  h @ down^T, with a torch SiLU-and-multiply between), and against dense's FFN (3 GEMVs, f wide)."""
import datetime

import torch
import torch.nn.functional as F
import triton.testing

from cmoe import triton_experts as te
from cmoe.moe import CMoEMLP, MoELayerSpec

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
dev, bf = "cuda", torch.bfloat16


def us(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=300) * 1e3


x = torch.randn(1, 4096, device=dev, dtype=bf)
for mb in (11, 22.5, 45, 90, 180, 360):
    rows = int(mb * 2**20 / (4096 * 2))
    w = torch.randn(rows, 4096, device=dev, dtype=bf)
    t = us(lambda: F.linear(x, w))
    print(f"cuBLAS GEMV [{rows} x 4096] {w.numel() * 2 / 1e6:.1f} MB: {t:.2f} us, {w.numel() * 2 / t / 1e6:.2f} TB/s", flush=True)
    del w

for shape, f in (("llama2-7b", 11008), ("llama3-8b", 14336)):
    for name, E, a in (("S1A1E8", 8, 1), ("S2A2E16", 16, 2)):
        m = f // E
        S = E // 8
        spec = MoELayerSpec(hidden_size=4096, shared_size=S * m, num_experts=E - S, expert_size=m, top_k=a, act="silu",
                            router="analytical")
        mod = CMoEMLP(spec, impl="triton").to(dev, bf).eval()
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_(0, 0.02)
            args = te.layer_args(mod)
            op = us(lambda: te.triton_gemv_op(x, *args))
            act_rows = (S + a) * m  # neurons read per token
            wgu = torch.randn(2 * act_rows, 4096, device=dev, dtype=bf)
            wd = torch.randn(4096, act_rows, device=dev, dtype=bf)

            def cublas_same_bytes():
                g, u = F.linear(x, wgu).chunk(2, dim=-1)
                return F.linear(F.silu(g) * u, wd)

            cb = us(cublas_same_bytes)
            wg, wu, wdn = (torch.randn(f, 4096, device=dev, dtype=bf), torch.randn(f, 4096, device=dev, dtype=bf),
                           torch.randn(4096, f, device=dev, dtype=bf))
            dense = us(lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wdn))
        nbytes = 3 * act_rows * 4096 * 2
        print(f"{shape} {name}: MoE GEMV op {op:.2f} us ({nbytes / op / 1e6:.2f} TB/s on {nbytes / 1e6:.1f} MB of experts); "
              f"cuBLAS, same bytes, 2 GEMVs + SiLU*up: {cb:.2f} us ({nbytes / cb / 1e6:.2f} TB/s); "
              f"dense FFN (cuBLAS, 3 GEMVs): {dense:.2f} us ({3 * f * 4096 * 2 / dense / 1e6:.2f} TB/s); "
              f"dense / op {dense / op:.3f}, dense / cuBLAS-same-bytes {dense / cb:.3f}", flush=True)
        del mod, wgu, wd, wg, wu, wdn
        torch.cuda.empty_cache()
print("done", flush=True)
