"""Session 14: decode at b=1 with q/k/v as one GEMM in both models (prototype ``fuse_qkv.py``, not in src/):
dense, S2A2E8 and S1A1E8 (llama2-7b shape), unfused and fused alternating in one process, 2 rounds.

    PYTHONPATH=src:benchmarks:.carry/s14 python .carry/s14/ab_qkv.py llama2-7b
"""
import datetime
import sys
import time

import torch

from cmoe import bench
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl
from fuse_qkv import fuse_qkv_, unfuse_qkv_

SHAPE = sys.argv[1]


def step_ms(model, b: int = 1) -> float:
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


t0 = time.time()
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE}", flush=True)
models = {"dense": bench.build_dense(SHAPE, layers=4)}
for config in ("S2A2E8", "S1A1E8"):
    moe = bench.build_dense(SHAPE, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    models[config] = moe
ids = torch.randint(0, 1000, (1, 64), device="cuda")
for name, model in models.items():
    with torch.no_grad():
        ref = model(ids).logits.float()
        fuse_qkv_(model)
        out = model(ids).logits.float()
        unfuse_qkv_(model)
    print(f"{name}: fused vs unfused logits, rel err {((out - ref).norm() / ref.norm()).item():.1e}", flush=True)
step_ms(models["dense"])  # warm-up, untimed
for rnd in range(2):
    for fused in (False, True):
        for model in models.values():
            (fuse_qkv_ if fused else unfuse_qkv_)(model)
        t = {name: step_ms(model) for name, model in models.items()}
        d = t["dense"]
        print(f"round {rnd} {'fused' if fused else 'unfused'} b=1: dense {d:.4f}, "
              + ", ".join(f"{n} {t[n]:.4f} ({d / t[n]:.4f}x)" for n in ("S2A2E8", "S1A1E8")), f" ms  [{time.time() - t0:.0f} s]", flush=True)
