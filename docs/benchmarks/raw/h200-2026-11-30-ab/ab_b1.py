"""Session 23, batch-1 decode A/Bs in one process (each arm re-captured; dense re-measured per round).

part "down": GEMV_CONFIG["down"] tiles of the MoE GEMV path (no recompile: the op reads it at capture).
part "ind":  inductor settings for the compiled decode step (recompiled per arm), dense and MoE alike.

    PYTHONPATH=src:benchmarks python .carry/s23/ab_b1.py down llama2-7b:S2A2E16,S1A1E8:2
    PYTHONPATH=src:benchmarks python .carry/s23/ab_b1.py ind llama2-7b:S2A2E16:2
"""
import datetime
import sys
import time

import torch
import torch._inductor.config as ic

from cmoe import bench, triton_experts
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

DOWN = [(8, 512, 4), (2, 2048, 2), (4, 1024, 4), (4, 1024, 2), (4, 512, 2), (16, 256, 4), (2, 1024, 1)]
IND = {
    "base": {},
    "multi_kernel": {"triton.multi_kernel": 1},
    "coord_descent": {"coordinate_descent_tuning": True},
    "both": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True},
}


def step_ms(model, recompile=False):
    if recompile:
        torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, 1, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


def build(shape, configs):
    models = {"dense": bench.build_dense(shape, layers=4)}
    for config in configs:
        t = time.time()
        models[config] = bench.build_dense(shape, layers=4)
        bench.convert_model_(models[config], config, (2, 512))
        set_expert_impl(models[config], "auto")
        print(f"# {shape} {config} converted in {time.time() - t:.0f} s", flush=True)
    return models


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
parts = sys.argv[1].split(",")
for job in sys.argv[2:]:
    shape, configs, rounds = (job.split(":") + ["2"])[:3]
    models = build(shape, configs.split(","))
    base_down = dict(triton_experts.GEMV_CONFIG)
    for part, rnd in [(p, r) for p in parts for r in range(int(rounds))]:
        if part == "down":
            d = step_ms(models["dense"])
            arms = DOWN if rnd % 2 == 0 else DOWN[::-1]
            res = {}
            for tile in arms:
                triton_experts.GEMV_CONFIG = dict(base_down, down=tile)
                for name, m in models.items():
                    if name != "dense":
                        res[(name, tile)] = step_ms(m)
            triton_experts.GEMV_CONFIG = base_down
            d2 = step_ms(models["dense"])
            for tile in DOWN:
                cells = " ".join(f"{n} {res[(n, tile)]:.4f} ({(d + d2) / 2 / res[(n, tile)]:.4f}x)" for n in models if n != "dense")
                print(f"{shape} round {rnd} down={tile}: dense {d:.4f}/{d2:.4f} {cells} ms", flush=True)
        else:
            names = list(IND) if rnd % 2 == 0 else list(IND)[::-1]
            res = {}
            for arm in names:
                try:
                    with ic.patch(IND[arm]):
                        t = time.time()
                        for name, m in models.items():
                            res[(name, arm)] = step_ms(m, recompile=True)
                    print(f"# {arm}: {time.time() - t:.0f} s", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"# {arm} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            for arm in IND:
                if ("dense", arm) not in res:
                    continue
                d = res[("dense", arm)]
                cells = " ".join(f"{n} {res[(n, arm)]:.4f} ({d / res[(n, arm)]:.4f}x)" for n in models if n != "dense")
                print(f"{shape} round {rnd} inductor {arm}: dense {d:.4f} {cells} ms", flush=True)
    del models
    torch.cuda.empty_cache()
print("done", flush=True)
