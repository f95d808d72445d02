"""Session 20: decode b=1, the whole GEMV path in one launch (one: GEMV_ONE_LAUNCH, the down
programs waiting on a device counter) against the two launches (two). Dense and the variants
alternate, each MoE time against the dense time measured just before.

    PYTHONPATH=src:benchmarks python .carry/s20/ab_decode.py llama2-7b:S1A1E8:2 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

VARIANTS = {  # name: (GEMV_ONE_LAUNCH, GEMV_LAYER_CONFIG)
    "two": (False, None),
    "one": (True, {"gate_up": (2, 2048), "down": (8, 512), "warps": 2}),
    "one-w4": (True, {"gate_up": (2, 2048), "down": (8, 512), "warps": 4}),
    "one-d4": (True, {"gate_up": (2, 2048), "down": (4, 512), "warps": 2}),
    "one-s100": (True, {"gate_up": (2, 2048), "down": (8, 512), "warps": 2, "sleep": 100}),
    "one-s500": (True, {"gate_up": (2, 2048), "down": (8, 512), "warps": 2, "sleep": 500}),
    "one-s2000": (True, {"gate_up": (2, 2048), "down": (8, 512), "warps": 2, "sleep": 2000}),
    "one-d16-s500": (True, {"gate_up": (2, 2048), "down": (16, 512), "warps": 4, "sleep": 500}),
}


def use(v):
    on, cfg = VARIANTS[v]
    te.GEMV_ONE_LAUNCH = on
    if cfg:
        te.GEMV_LAYER_CONFIG = cfg


def step_ms(model, b=1):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
names = sys.argv[1].split(",")
for job in sys.argv[2:]:
    shape, config, rounds = (job.split(":") + ["2"])[:3]
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    for v in names:
        use(v)
        print(f"{shape} {config} {v}: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 2, 3)):.1e}", flush=True)
    use("two")
    step_ms(dense)
    for rnd in range(int(rounds)):
        d = step_ms(dense)
        line = [f"{shape} {config} round {rnd} b=1: dense {d:.4f}"]
        for v in names if rnd % 2 == 0 else names[::-1]:
            use(v)
            t = step_ms(moe)
            line.append(f"{v} {t:.4f} ({d / t:.4f}x)")
        print(", ".join(line), " ms", flush=True)
    del dense, moe
    torch.cuda.empty_cache()
print("done", flush=True)
