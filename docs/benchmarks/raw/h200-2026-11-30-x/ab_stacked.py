"""Session 19: decode at b=128/256 on the dense path, the shared and routed gate/up weights stacked
in one storage and run as one GEMM (on: DENSE_STACKED) against two GEMMs, the shared expert on the
second stream (off). Dense / on / off alternating (order reversed every other round); each MoE
time against the dense time of the same round.

    PYTHONPATH=src:benchmarks python .carry/s19/ab_stacked.py llama2-7b:S3A3E8:3 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import _prepare_experts, time_generation
from cmoe.moe import moe_layers, set_expert_impl


def step_ms(model, b):
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for job in sys.argv[1:]:
    shape, config, rounds = (job.split(":") + ["3"])[:3]
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    _prepare_experts(moe)
    assert all(te.gate_up_stacked(m.shared_gate_up.weight, m.experts.gate_up_proj) is not None for m in moe_layers(moe))
    for v in (True, False):
        te.DENSE_STACKED = v
        print(f"{shape} {config} stacked={v}: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(129, 256, 300)):.1e}", flush=True)
    for b in (128, 256):
        te.DENSE_STACKED = True
        step_ms(dense, b)
        step_ms(moe, b)
        for rnd in range(int(rounds)):
            d = step_ms(dense, b)
            line = [f"{shape} {config} b={b} round {rnd}: dense {d:.4f}"]
            for v in (True, False) if rnd % 2 == 0 else (False, True):
                te.DENSE_STACKED = v
                t = step_ms(moe, b)
                line.append(f"{'on' if v else 'off'} {t:.4f} ({d / t:.4f}x)")
            print(", ".join(line), " ms", flush=True)
    te.DENSE_STACKED = True
    del dense, moe
    torch.cuda.empty_cache()
print("done", flush=True)
