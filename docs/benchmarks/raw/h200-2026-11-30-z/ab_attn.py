"""Session 21: the decode step with its attention in cmoe.decode_attention (on) or transformers'
SDPA attention (off), dense and MoE alike, alternating in one process.

    PYTHONPATH=src:benchmarks python .carry/s21/ab_attn.py llama2-7b:S1A1E8:2:1,256 ...
"""
import datetime
import sys

import torch

from cmoe import attention, bench
from cmoe.generation import generate, time_generation
from cmoe.moe import set_expert_impl


def step_ms(model, b, on):
    attention.DECODE_KERNEL = on
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, config, rounds, batches = (job.split(":") + ["2", "1"])[:4]
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for name, m in (("dense", dense), (config, moe)):
        toks = {}
        for on in (False, True):
            attention.DECODE_KERNEL = on
            torch._dynamo.reset()
            m.__dict__.pop("_cmoe_static_caches", None)
            toks[on] = generate(m, ids, 16, compile=True)
        same = (toks[True] == toks[False]).float().mean().item()
        print(f"{shape} {name}: greedy tokens on vs off, 2 x 16 new: {same * 100:.1f} % equal", flush=True)
    for b in map(int, batches.split(",")):
        for rnd in range(int(rounds)):
            line = [f"{shape} {config} b={b} round {rnd}:"]
            res = {}
            for on in (False, True) if rnd % 2 == 0 else (True, False):
                res[("dense", on)] = step_ms(dense, b, on)
                res[("moe", on)] = step_ms(moe, b, on)
            for on in (False, True):
                d, t = res[("dense", on)], res[("moe", on)]
                line.append(f"{'on ' if on else 'off'} dense {d:.4f} moe {t:.4f} ({d / t:.4f}x)")
            print(" ".join(line), " ms", flush=True)
    del dense, moe
    torch.cuda.empty_cache()
print("done", flush=True)
