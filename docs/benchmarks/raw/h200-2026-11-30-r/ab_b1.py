"""Prepared in session 12 for the next GPU session (not run yet): decode at b=1, S2A2E8 (7.0 us per
step short of 90 % on llama2-7b, 0.9 us on llama3-8b in run q), dense and two variants alternating in
one process, each MoE time against the dense time measured just before:
  base  the final code (router: two split kernels at one token);
  R1    the router in one kernel at one token (ROUTE_SPLIT_MAX_TOKENS = 0 sends every size there).

    PYTHONPATH=src:benchmarks python .carry/s12/ab_b1.py llama2-7b S2A2E8      # about 2 min
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

SHAPE, CONFIG = (sys.argv[1:3] + ["llama2-7b", "S2A2E8"][len(sys.argv[1:3]):])
SPLIT = te.ROUTE_SPLIT_MAX_TOKENS


def step_ms(model, b: int = 1) -> float:
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE} {CONFIG}", flush=True)
dense = bench.build_dense(SHAPE, layers=4)
moe = bench.build_dense(SHAPE, layers=4)
bench.convert_model_(moe, CONFIG, (2, 512))
set_expert_impl(moe, "auto")
print(f"check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 3)):.1e}", flush=True)
step_ms(dense)  # warm-up, untimed
for rnd in range(3):
    d = step_ms(dense)
    line = [f"round {rnd} b=1: dense {d:.4f}"]
    for v in ("base", "R1"):
        te.ROUTE_SPLIT_MAX_TOKENS = 0 if v == "R1" else SPLIT
        t = step_ms(moe)
        line.append(f"{v} {t:.4f} ({d / t:.4f}x)")
    te.ROUTE_SPLIT_MAX_TOKENS = SPLIT
    print(", ".join(line), " ms", flush=True)
