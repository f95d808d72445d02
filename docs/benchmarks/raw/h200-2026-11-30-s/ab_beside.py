"""Session 14: decode at b=1, the router beside the shared expert's gate/up GEMV (ROUTER_BESIDE, the
GEMV path's whole-layer op) against the router then the experts (two ops, the code before), dense
and the two alternating in one process, each MoE time against the dense time measured just before.

    PYTHONPATH=src:benchmarks python .carry/s14/ab_beside.py llama2-7b S2A2E8 S1A1E8 S2A2E16
"""
import datetime
import sys
import time

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

SHAPE, CONFIGS = sys.argv[1], sys.argv[2:]
ROUNDS = 2


def step_ms(model, b: int = 1) -> float:
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


t0 = time.time()
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE}", flush=True)
dense = bench.build_dense(SHAPE, layers=4)
step_ms(dense)  # warm-up, untimed
for config in CONFIGS:
    moe = bench.build_dense(SHAPE, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    for v in (False, True):
        te.ROUTER_BESIDE = v
        print(f"{config} beside={v}: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 2)):.1e}", flush=True)
    for rnd in range(ROUNDS):
        d = step_ms(dense)
        line = [f"{config} round {rnd} b=1: dense {d:.4f}"]
        for v in (False, True):
            te.ROUTER_BESIDE = v
            t = step_ms(moe)
            line.append(f"{'beside' if v else 'base'} {t:.4f} ({d / t:.4f}x)")
        print(", ".join(line), f" ms  [{time.time() - t0:.0f} s]", flush=True)
    te.ROUTER_BESIDE = True
    del moe
    torch.cuda.empty_cache()
