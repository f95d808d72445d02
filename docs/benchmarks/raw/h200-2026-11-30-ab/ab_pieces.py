"""Session 23: the batch-1 GEMV layer op's down GEMV, one (token, slot) per program summed by the
caller (GEMV_DOWN_PIECES) against the single-output kernel, and some tiles; alternating in one
process, each arm re-captured (recompiled when the op's output shape changes); dense per round.

    PYTHONPATH=src:benchmarks python .carry/s23/ab_pieces.py llama2-7b:S2A2E16,S1A1E8:2 ...
"""
import datetime
import sys
import time

import torch

from cmoe import bench, triton_experts as te
from cmoe.generation import generate, time_generation
from cmoe.moe import set_expert_impl

GU = te.GEMV_CONFIG["gate_up"]
ARMS = {
    "old": dict(GEMV_DOWN_PIECES=False),
    "pieces 4x2048x4": dict(GEMV_PIECES_CONFIG=(4, 2048, 4)),
    "pieces 2x2048x2": dict(GEMV_PIECES_CONFIG=(2, 2048, 2)),
    "pieces 8x1024x4": dict(GEMV_PIECES_CONFIG=(8, 1024, 4)),
    "pieces 4x2048x4 gu 1x4096x4": dict(GEMV_PIECES_CONFIG=(4, 2048, 4), GEMV_CONFIG={"gate_up": (1, 4096, 4), "down": (8, 512, 4)}),
    "pieces 4x2048x4 gu 2x4096x4": dict(GEMV_PIECES_CONFIG=(4, 2048, 4), GEMV_CONFIG={"gate_up": (2, 4096, 4), "down": (8, 512, 4)}),
}
BASE = dict(GEMV_DOWN_PIECES=True, GEMV_PIECES_CONFIG=te.GEMV_PIECES_CONFIG, GEMV_CONFIG=dict(te.GEMV_CONFIG))


def set_arm(arm):
    changed = False
    for k, v in {**BASE, **ARMS[arm]}.items():
        if k == "GEMV_DOWN_PIECES" and getattr(te, k) != v:
            changed = True
        setattr(te, k, v)
    if changed:
        torch._dynamo.reset()


def step_ms(model):
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, 1, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, configs, rounds = (job.split(":") + ["2"])[:3]
    models = {"dense": bench.build_dense(shape, layers=4)}
    for config in configs.split(","):
        t = time.time()
        models[config] = bench.build_dense(shape, layers=4)
        bench.convert_model_(models[config], config, (2, 512))
        set_expert_impl(models[config], "auto")
        print(f"# {shape} {config} converted in {time.time() - t:.0f} s", flush=True)
    ids = torch.randint(0, 1000, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for name, m in models.items():  # the two down kernels give the same greedy tokens (bf16: near-ties may differ)
        if name == "dense":
            continue
        toks = {}
        for arm in ("old", "pieces 4x2048x4"):
            set_arm(arm)
            m.__dict__.pop("_cmoe_static_caches", None)
            with torch.no_grad():
                toks[arm] = generate(m, ids, 16, compile=True)
        same = (toks["old"] == toks["pieces 4x2048x4"]).float().mean().item()
        print(f"{shape} {name}: greedy tokens old vs pieces, 16 new: {same * 100:.1f} % equal", flush=True)
    for rnd in range(int(rounds)):
        set_arm("old")
        d = step_ms(models["dense"])
        res = {}
        for arm in list(ARMS) if rnd % 2 == 0 else list(ARMS)[::-1]:
            t = time.time()
            set_arm(arm)
            for name, m in models.items():
                if name != "dense":
                    res[(name, arm)] = step_ms(m)
            print(f"# {arm}: {time.time() - t:.0f} s", flush=True)
        d2 = step_ms(models["dense"])
        for arm in ARMS:
            cells = " ".join(f"{n} {res[(n, arm)]:.4f} ({(d + d2) / 2 / res[(n, arm)]:.4f}x)" for n in models if n != "dense")
            print(f"{shape} round {rnd} {arm}: dense {d:.4f}/{d2:.4f} {cells} ms", flush=True)
    del models
    torch.cuda.empty_cache()
print("done", flush=True)
