"""Session 22: the decode step with the attention projections through cmoe.gemv (on) or cuBLAS
(off), dense and MoE alike, alternating in one process; greedy argmax in two passes in both.

    PYTHONPATH=src:benchmarks python .carry/s22/ab_gemv.py llama2-7b:S1A1E8,S2A2E16:2:1 ...
"""
import datetime
import sys

import torch

from cmoe import bench, generation
from cmoe.generation import generate, time_generation
from cmoe.moe import set_expert_impl


def step_ms(model, b, on):
    generation.GEMV_PROJECTIONS = on
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, configs, rounds, batches = (job.split(":") + ["2", "1"])[:4]
    models = {"dense": bench.build_dense(shape, layers=4)}
    for config in configs.split(","):
        models[config] = bench.build_dense(shape, layers=4)
        bench.convert_model_(models[config], config, (2, 512))
        set_expert_impl(models[config], "auto")
    ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for name, m in models.items():
        toks = {}
        for on in (False, True):
            generation.GEMV_PROJECTIONS = on
            torch._dynamo.reset()
            m.__dict__.pop("_cmoe_static_caches", None)
            toks[on] = generate(m, ids[:1], 16, compile=True)
        same = (toks[True] == toks[False]).float().mean().item()
        print(f"{shape} {name}: greedy tokens on vs off, 1 x 16 new: {same * 100:.1f} % equal", flush=True)
    for b in map(int, batches.split(",")):
        for rnd in range(int(rounds)):
            res = {}
            for on in (False, True) if rnd % 2 == 0 else (True, False):
                for name, m in models.items():
                    res[(name, on)] = step_ms(m, b, on)
            for on in (False, True):
                d = res[("dense", on)]
                cells = " ".join(f"{name} {res[(name, on)]:.4f} ({d / res[(name, on)]:.4f}x)" for name in models if name != "dense")
                print(f"{shape} b={b} round {rnd} {'on ' if on else 'off'}: dense {d:.4f} {cells} ms", flush=True)
    del models
    torch.cuda.empty_cache()
generation.GEMV_PROJECTIONS = True
print("done", flush=True)
