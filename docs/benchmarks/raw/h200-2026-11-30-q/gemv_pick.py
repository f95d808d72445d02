"""Session 12: the whole two-kernel GEMV (te._gemv_experts) with candidate gate_up tiles, llama2/llama3
shapes, every configuration, 1 and 2 tokens (4 layers per CUDA graph, candidates alternating).
    PYTHONPATH=src:benchmarks:.carry/s12 python .carry/s12/gemv_pick.py
"""
import torch

from bench_experts import graph_ms
from cmoe import triton_experts as te
from pdl_gemv import case

CANDS = [(8, 512, 4), (2, 2048, 2), (2, 1024, 2), (4, 1024, 2), (4, 2048, 2), (16, 256, 2), (8, 512, 2), (2, 2048, 4)]
print(torch.cuda.get_device_name(), flush=True)
for shape, d, f in (("llama2-7b", 4096, 11008), ("llama3-8b", 4096, 14336)):
    for name, sp, a, pieces in [("S2A2E8", 2, 2, 8), ("S1A1E8", 1, 1, 8), ("S3A3E8", 3, 3, 8), ("S2A2E16", 2, 2, 16)]:
        m = f // pieces
        E, ms = pieces - sp, sp * m
        for T in (1, 2):
            if T * a > te.GEMV_MAX_PAIRS:
                continue
            layers = [case(T, a, E, m, ms, d, torch.bfloat16, "cuda", seed=i) for i in range(4)]
            ref = te._gemv_experts(*layers[0][:5], "silu", shared=layers[0][5])
            line = []
            for rnd in range(2):
                for c in CANDS:
                    cfg = {"gate_up": c, "down": te.GEMV_CONFIG["down"]}
                    out = te._gemv_experts(*layers[0][:5], "silu", cfg=cfg, shared=layers[0][5])
                    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
                    t = graph_ms(lambda: [te._gemv_experts(*L[:5], "silu", cfg=cfg, shared=L[5]) for L in layers]) / 4
                    line.append(f"{c}: {t * 1e3:.1f}")
                print(f"{shape} {name} T={T} round {rnd}: " + ", ".join(line[-len(CANDS):]), flush=True)
