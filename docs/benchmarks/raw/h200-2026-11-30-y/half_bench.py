"""Session 20: the routed grouped kernels alone (gate/up + down, 2048 tokens, the routing of a
converted layer's shape: balanced-ish counts), half tiles on/off, each timed in a CUDA graph."""
import datetime

import torch
import triton.testing

from cmoe import triton_experts as te

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
for shape, (d, f) in SHAPES.items():
    for name, E, a in (("S1A1E8", 8, 1), ("S2A2E16", 16, 2)):
        m = f // E
        R = E - (E // 8)  # routed experts: S1A1E8 -> 7, S2A2E16 -> 14
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(2048, d, device="cuda", dtype=torch.bfloat16, generator=g)
        gu = torch.randn(R, 2 * m, d, device="cuda", dtype=torch.bfloat16, generator=g) / d**0.5
        dn = torch.randn(R, d, m, device="cuda", dtype=torch.bfloat16, generator=g) / m**0.5
        scores = torch.randn(2048, R, device="cuda", generator=g)
        idx = scores.topk(a, dim=1).indices
        w = torch.rand(2048, a, device="cuda", generator=g) + 0.5
        counts = torch.bincount(idx.flatten(), minlength=R).tolist()
        flops = 2 * 2048 * a * 3 * m * d
        res = {}
        for half in (True, False, True, False):
            te.GROUPED_HALF_TILES = half
            ms = triton.testing.do_bench_cudagraph(lambda: te._grouped_experts(x, idx, w, gu, dn, "silu"), rep=200)
            res.setdefault(half, []).append(ms)
        on, off = min(res[True]), min(res[False])
        print(f"{shape} {name} m={m} rows per expert {counts} (last tile mod 128: {[c % 128 for c in counts]}): "
              f"on {res[True]} off {res[False]} ms; best on {on * 1e3:.1f} us ({flops / on / 1e9:.0f} TFLOP/s), "
              f"off {off * 1e3:.1f} us ({flops / off / 1e9:.0f} TFLOP/s), off/on {off / on:.3f}", flush=True)
print("done", flush=True)
