"""Session 21: decode_attention's settings at a few batches (the op reads them at run time, so one
compile serves every setting; a CUDA graph per setting).
    spec: BLOCK_KEYS/PROGRAMS_PER_SM/MAX_SLICES/NUM_WARPS/NUM_STAGES, comma-separated."""
import sys

import torch

from bench_decode_attention import SHAPES, _Attn
from bench_experts import graph_ms
from cmoe import attention
from cmoe import decode_attention as da

specs = sys.argv[1].split(",")
batches = [int(b) for b in sys.argv[2].split(",")]
print(f"# {torch.cuda.get_device_name()}; us per layer; spec = BLOCK_KEYS/PROGRAMS_PER_SM/MAX_SLICES/NUM_WARPS/NUM_STAGES")
for shape, (H, HKV, D) in SHAPES.items():
    for B in batches:
        L = 545
        n = max(2, min(64, (256 << 20) // (4 * B * HKV * L * D) + 1))
        qs = [torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(n)]
        ks = [torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        vs = [torch.randn_like(k) for k in ks]
        mask = (torch.arange(L, device="cuda") < 530).view(1, 1, 1, -1).expand(B, 1, 1, -1).contiguous()
        mod = _Attn(H // HKV)
        fn = torch.compile(lambda q, k, v, m: attention.causal_sdpa_forward(mod, q, k, v, m, dropout=0.0, scaling=D**-0.5)[0],
                           fullgraph=True)
        row = []
        for spec in specs:
            da.BLOCK_KEYS, da.PROGRAMS_PER_SM, da.MAX_SLICES, da.NUM_WARPS, da.NUM_STAGES = map(int, spec.split("/"))
            t = graph_ms(lambda: [fn(qs[i], ks[i], vs[i], mask) for i in range(n)], iters=1) * 1e3 / n
            row.append(f"{spec} {t:.2f}")
        print(f"{shape} b={B} slices(BH={B * HKV}): " + " | ".join(row), flush=True)
        del qs, ks, vs
        torch.cuda.empty_cache()
