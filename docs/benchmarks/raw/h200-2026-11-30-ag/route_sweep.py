"""Session 28: the split router alone at T tokens (LLaMA-2-7B d), linear router over 7 experts,
top-1, for tiles of 16/32/64 tokens and slices of 256/512 columns; CUDA-graph replays."""
import torch
import triton
import triton.testing

from cmoe import triton_experts as te

d, E = 4096, 7
for T in (256, 2048, 4096):
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(E, d, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.zeros(E, device="cuda")
    sc = torch.ones(E, device="cuda")
    ref = te.triton_route_op(x, g, g, b, sc, "silu", 1, True)
    for tile in (16, 32, 64):
        for k in (256, 512):
            te.ROUTE_WIDE_MIN_TOKENS, te.ROUTE_WIDE_TILE, te.ROUTE_SPLIT_K = 1, tile, k
            out = te.triton_route_op(x, g, g, b, sc, "silu", 1, True)
            same = torch.equal(out[0], ref[0])
            ms = triton.testing.do_bench_cudagraph(lambda: te.triton_route_op(x, g, g, b, sc, "silu", 1, True), rep=200)
            print(f"T={T} tile={tile} split_k={k}: {ms * 1e3:.1f} us  (same experts as tile 16/256: {same})", flush=True)
