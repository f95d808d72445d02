"""Session 20: the routed grouped kernels alone (gate/up + down, 2048 tokens, top-a of random scores),
the prefill tiles with the tile-order group size GROUP swept (cfg "group"; 8 in the code). Each timed
in a CUDA graph (triton.testing.do_bench_cudagraph), best of two."""
import datetime

import torch
import triton.testing

from cmoe import triton_experts as te

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
base = te.grouped_config(1 << 20)
for shape, (d, f) in SHAPES.items():
    for name, E, a in (("S1A1E8", 8, 1), ("S2A2E16", 16, 2)):
        m = f // E
        R = E - (E // 8)
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(2048, d, device="cuda", dtype=torch.bfloat16, generator=g)
        gu = torch.randn(R, 2 * m, d, device="cuda", dtype=torch.bfloat16, generator=g) / d**0.5
        dn = torch.randn(R, d, m, device="cuda", dtype=torch.bfloat16, generator=g) / m**0.5
        idx = torch.randn(2048, R, device="cuda", generator=g).topk(a, dim=1).indices
        w = torch.rand(2048, a, device="cuda", generator=g) + 0.5
        flops = 2 * 2048 * a * 3 * m * d
        ref = te._grouped_experts(x, idx, w, gu, dn, "silu", base)
        out = []
        for group in (8, 1, 2, 3, 4, 16, 32, 8):
            cfg = {**base, "group": group}
            assert torch.equal(te._grouped_experts(x, idx, w, gu, dn, "silu", cfg), ref)
            t = min(triton.testing.do_bench_cudagraph(lambda: te._grouped_experts(x, idx, w, gu, dn, "silu", cfg), rep=200)
                    for _ in range(2))
            out.append(f"group {group}: {t * 1e3:.1f} us ({flops / t / 1e9:.0f} TFLOP/s)")
        print(f"{shape} {name}: " + "; ".join(out), flush=True)
print("done", flush=True)
