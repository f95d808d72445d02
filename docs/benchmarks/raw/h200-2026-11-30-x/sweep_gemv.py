"""Session 19: the batch-1 GEMV op's tiles, (BN, BK, num_warps) of its gate/up launch (the router
and every slot's gate/up in one launch, tuned so far for the separate gate/up kernel, run q) and of
its down launch, timed as the whole captured decode step (S1A1E8, 4 layers). Variants alternate
with dense in each round; the tiles are read by the op at capture time (no recompile).

    PYTHONPATH=src:benchmarks python .carry/s19/sweep_gemv.py llama2-7b:S1A1E8:2 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

BASE = dict(te.GEMV_CONFIG)
GATE_UP = [(2, 2048, 2), (1, 4096, 2), (2, 4096, 4), (4, 1024, 2), (4, 2048, 4), (2, 1024, 1), (1, 2048, 1), (4, 4096, 8)]
DOWN = [(4, 1024, 4), (8, 1024, 8), (16, 512, 8), (4, 512, 2), (2, 2048, 4)]
VARIANTS = [("base", BASE)] + [(f"gu{g}", {**BASE, "gate_up": g}) for g in GATE_UP[1:]] + [(f"dn{d}", {**BASE, "down": d}) for d in DOWN]


def step_ms(model, b=1):
    model.__dict__.pop("_cmoe_static_caches", None)
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, config, rounds = (job.split(":") + ["2"])[:3]
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    for name, cfg in VARIANTS:
        te.GEMV_CONFIG = cfg
        err = bench.check_fast_path(moe, tokens=(1, 2))
        if err > 2e-2:
            print(f"{shape} {config} {name}: check FAILED {err:.1e}", flush=True)
    te.GEMV_CONFIG = BASE
    step_ms(dense)
    step_ms(moe)
    res = {name: [] for name, _ in VARIANTS}
    for rnd in range(int(rounds)):
        d = step_ms(dense)
        for name, cfg in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:
            te.GEMV_CONFIG = cfg
            res[name].append(step_ms(moe))
        te.GEMV_CONFIG = BASE
        print(f"{shape} {config} round {rnd}: dense {d:.4f} ms; " + ", ".join(f"{n} {v[-1]:.4f}" for n, v in res.items()), flush=True)
    best = min(res, key=lambda n: min(res[n]))
    print(f"{shape} {config}: best {best} {min(res[best]):.4f} ms vs base {min(res['base']):.4f} ms", flush=True)
    del dense, moe
    torch.cuda.empty_cache()
print("done", flush=True)
