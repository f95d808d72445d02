"""Session 15: decode at large batch with q/k/v as one GEMM (cmoe.fused_qkv, 3f25e1b) on and off, alternating
in one process: dense, S3A3E8, S2A2E8 (llama2-7b shape, 4 layers), 2 rounds.

    PYTHONPATH=src:benchmarks python .carry/s15/ab_qkv256.py llama2-7b 256
"""
import datetime
import sys
import time

import torch

import cmoe.fused_qkv as fq
from cmoe import bench
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

SHAPE, B = sys.argv[1], int(sys.argv[2])
ON = fq.fuse_qkv_


def step_ms(model, b: int) -> float:
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


t0 = time.time()
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE} b={B}", flush=True)
models = {"dense": bench.build_dense(SHAPE, layers=4)}
for config in ("S3A3E8", "S2A2E8"):
    moe = bench.build_dense(SHAPE, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    models[config] = moe
step_ms(models["dense"], B)  # warm-up, untimed
for rnd in range(2):
    for fused in (False, True):
        fq.fuse_qkv_ = ON if fused else (lambda model: [])
        t = {name: step_ms(model, B) for name, model in models.items()}
        d = t["dense"]
        print(f"round {rnd} {'fused' if fused else 'unfused'} b={B}: dense {d:.4f}, "
              + ", ".join(f"{n} {t[n]:.4f} ({d / t[n]:.4f}x)" for n in ("S3A3E8", "S2A2E8")), f" ms  [{time.time() - t0:.0f} s]", flush=True)
