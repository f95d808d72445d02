"""Session 23: inductor's coordinate-descent tuning (which also turns one-row matmuls into its own
reductions) for the batch-1 decode step of dense and MoE alike, and the MoE's routed experts as
torch ops on gathered weights ("gather": inductor then reads only the chosen experts' rows) under
it; alternating arms in one process, recompiled per arm.

    PYTHONPATH=src:benchmarks python .carry/s23/ab_cd.py llama2-7b:S2A2E16,S1A1E8:1 ...
"""
import datetime
import sys
import time

import torch
import torch._inductor.config as ic

from cmoe import bench
from cmoe.generation import generate, time_generation
from cmoe.moe import set_expert_impl

ARMS = {  # (inductor settings, MoE impl)
    "base auto": ({}, "auto"),
    "coord auto": ({"coordinate_descent_tuning": True}, "auto"),
    "coord gather": ({"coordinate_descent_tuning": True}, "gather"),
}


def step_ms(model):
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, 1, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, configs, rounds = (job.split(":") + ["1"])[:3]
    models = {"dense": bench.build_dense(shape, layers=4)}
    for config in configs.split(","):
        t = time.time()
        models[config] = bench.build_dense(shape, layers=4)
        bench.convert_model_(models[config], config, (2, 512))
        print(f"# {shape} {config} converted in {time.time() - t:.0f} s", flush=True)
    ids = torch.randint(0, 1000, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    toks = {}
    for rnd in range(int(rounds)):
        res = {}
        for arm in list(ARMS) if rnd % 2 == 0 else list(ARMS)[::-1]:
            cfg, impl = ARMS[arm]
            t = time.time()
            try:
                with ic.patch(cfg):
                    torch._dynamo.reset()
                    for name, m in models.items():
                        if name != "dense":
                            set_expert_impl(m, impl)
                        elif impl != "auto":  # dense does not depend on the MoE impl: measured in "coord auto"
                            continue
                        res[(name, arm)] = step_ms(m)
                        if rnd == 0 and name != "dense":
                            m.__dict__.pop("_cmoe_static_caches", None)
                            toks[(name, arm)] = generate(m, ids, 16, compile=True)
            except Exception as e:  # noqa: BLE001
                print(f"# {arm} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            print(f"# {arm}: {time.time() - t:.0f} s", flush=True)
        for arm in ARMS:
            d = res.get(("dense", arm)) or res.get(("dense", "coord auto"))
            if d is None:
                continue
            cells = " ".join(f"{n} {res[(n, arm)]:.4f} ({d / res[(n, arm)]:.4f}x)" for n in models if n != "dense" and (n, arm) in res)
            print(f"{shape} round {rnd} {arm}: dense {d:.4f} {cells} ms", flush=True)
    for name in models:
        if name != "dense" and (name, "coord gather") in toks and (name, "base auto") in toks:
            same = (toks[(name, "coord gather")] == toks[(name, "base auto")]).float().mean().item()
            print(f"{shape} {name}: greedy tokens, gather (coord) vs auto (base), 16 new: {same * 100:.1f} % equal", flush=True)
    del models
    torch.cuda.empty_cache()
print("done", flush=True)
