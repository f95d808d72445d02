"""Session 20: prefill 1x2048, an expert's last tile multiplying half its rows when at most half
full (GROUPED_HALF_TILES on) against whole tiles (off). Dense / on / off alternating, each in one
CUDA graph per variant.

    PYTHONPATH=src:benchmarks python .carry/s20/ab_prefill.py llama2-7b:S1A1E8:3 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.attention import unpadded_prefill
from cmoe.fused_qkv import fused_qkv
from cmoe.moe import set_expert_impl

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)


def prefill_ms(model, ids):  # the flag is read inside the op at run time: no recompile
    with torch.no_grad(), fused_qkv(model), unpadded_prefill():
        t, how = bench.time_prefill(bench.prefill_forward(model, ids), repeats=7)
    return t * 1e3


for job in sys.argv[1:]:
    shape, config, rounds = (job.split(":") + ["3"])[:3]
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    ids = torch.randint(0, dense.config.vocab_size, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    layer = next(m for m in moe.modules() if type(m).__name__ == "CMoEMLP")
    x = torch.randn(2048, layer.spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        outs = {}
        for v in (True, False):
            te.GROUPED_HALF_TILES = v
            outs[v] = layer(x).float()
        ref = layer.forward_reference(x).float()
        idx, _, _ = layer.router(x)
        counts = torch.bincount(idx.flatten(), minlength=layer.spec.num_experts).tolist()
    print(f"{shape} {config}: rows per expert {counts}; one layer at 2048 tokens, on vs off rel "
          f"{((outs[True] - outs[False]).norm() / outs[False].norm()).item():.1e}, "
          f"on vs loop oracle {((outs[True] - ref).norm() / ref.norm()).item():.1e}, off vs oracle {((outs[False] - ref).norm() / ref.norm()).item():.1e}", flush=True)
    prefill_ms(dense, ids)
    for rnd in range(int(rounds)):
        d = prefill_ms(dense, ids)
        line = [f"{shape} {config} round {rnd} prefill 1x2048: dense {d:.4f}"]
        for v in (True, False) if rnd % 2 == 0 else (False, True):
            te.GROUPED_HALF_TILES = v
            t = prefill_ms(moe, ids)
            line.append(f"{'on' if v else 'off'} {t:.4f} ({d / t:.4f}x)")
        te.GROUPED_HALF_TILES = True
        print(", ".join(line), " ms", flush=True)
    del dense, moe
    torch.cuda.empty_cache()
print("done", flush=True)
