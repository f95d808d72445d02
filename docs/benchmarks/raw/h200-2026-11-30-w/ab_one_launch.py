"""Session 18: decode b=1 on the GEMV path, the router and the gate/up GEMV in one launch (new,
``GEMV_ONE_LAUNCH``: routed programs wait on the device for the router's programs of the same
launch) against the router on a second stream beside the shared gate/up, then the routed gate/up
(old). Dense / old / new alternating, each MoE time against the dense time measured just before.

    PYTHONPATH=src:benchmarks python .carry/s18/ab_one_launch.py llama2-7b:S1A1E8:2 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

VARIANTS = ("old", "fill", "kept")  # fill: the flags zeroed by a fill kernel per layer; kept: one buffer, reset by the down kernel


def use(v):
    te.GEMV_ONE_LAUNCH = v != "old"
    te.GEMV_SYNC_KEPT = v == "kept"


def step_ms(model, b=1):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, config, rounds = (job.split(":") + ["2"])[:3]
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    for v in VARIANTS:
        use(v)
        print(f"{shape} {config} {v}: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 2, 3)):.1e}", flush=True)
    step_ms(dense)
    for rnd in range(int(rounds)):
        d = step_ms(dense)
        line = [f"{shape} {config} round {rnd} b=1: dense {d:.4f}"]
        for v in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:
            use(v)
            t = step_ms(moe)
            line.append(f"{v} {t:.4f} ({d / t:.4f}x)")
        use("kept")
        print(", ".join(line), " ms", flush=True)
    del dense, moe
    torch.cuda.empty_cache()
