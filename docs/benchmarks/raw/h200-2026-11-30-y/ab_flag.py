"""Session 20: decode b=1, the GEMV op's routed programs waiting for the router: polling with a
nanosleep between loads (sN: N ns) and/or the flag on its own 128-byte line (apart: sync[32], away
from the router's ticket in sync[0]), against the current code (base). Dense and the variants
alternate, each MoE time against the dense time measured just before.

    PYTHONPATH=src:benchmarks python .carry/s20/ab_flag.py base,s200,apart,apart-s200 llama2-7b:S1A1E8:2 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

VARIANTS = {"base": (0, 1), "s200": (200, 1), "s1000": (1000, 1), "apart": (0, 32), "apart-s200": (200, 32)}


def use(v):
    te.GEMV_CONFIG["sleep"], te.GEMV_CONFIG["flag"] = VARIANTS[v]


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
    use("base")
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
