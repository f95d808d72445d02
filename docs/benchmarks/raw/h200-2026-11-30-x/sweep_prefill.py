"""Session 19: prefill 1x2048 (4 layers, compiled, one CUDA graph per variant) with the routed
experts' grouped kernels in other tiles, and with torch's grouped GEMM at any rows per expert
(GROUPED_MM_MIN_ROWS = 0 instead of 640). The op reads both at capture time (no recompile).
Dense and the variants alternate in each round.

    PYTHONPATH=src:benchmarks python .carry/s19/sweep_prefill.py llama2-7b:S1A1E8:2 ...
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.attention import unpadded_prefill
from cmoe.fused_qkv import fused_qkv
from cmoe.moe import set_expert_impl

BASE = list(te.GROUPED_CONFIGS)
PREFILL = BASE[-1][1]


def with_prefill(cfg):
    return BASE[:-1] + [(None, cfg)]


VARIANTS = [
    ("base", BASE, 640),
    ("gmm", BASE, 0),
    ("bt64", with_prefill(dict(bt=64, gate_up=(128, 64, 4, 4), down=(128, 64, 4, 4))), 640),
    ("bt64-wide", with_prefill(dict(bt=64, gate_up=(256, 64, 8, 3), down=(256, 64, 8, 3))), 640),
    ("bt128-s3", with_prefill(dict(bt=128, gate_up=(128, 64, 8, 3), down=(256, 64, 8, 3))), 640),
    ("bt128-n256", with_prefill(dict(bt=128, gate_up=(256, 64, 8, 2), down=(128, 64, 8, 4))), 640),
]


def use(v):
    _, cfgs, rows = v
    te.GROUPED_CONFIGS, te.GROUPED_MM_MIN_ROWS = cfgs, rows


def prefill_ms(model, ids):
    with torch.no_grad(), fused_qkv(model), unpadded_prefill():
        t, how = bench.time_prefill(bench.prefill_forward(model, ids), repeats=7)
    return t * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
dense = {}
for job in sys.argv[1:]:
    shape, config, rounds = (job.split(":") + ["2"])[:3]
    if shape not in dense:
        dense.clear()
        torch.cuda.empty_cache()
        dense[shape] = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    ids = torch.randint(0, moe.config.vocab_size, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    layer = next(m for m in moe.modules() if type(m).__name__ == "CMoEMLP")
    x = torch.randn(2048, layer.spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer.forward_reference(x).float()
        for v in list(VARIANTS):
            use(v)
            try:
                out = layer(x).float()
            except Exception as e:  # noqa: BLE001  (a tile that does not fit)
                print(f"{shape} {config} {v[0]}: dropped, {type(e).__name__}: {str(e)[:160]}", flush=True)
                VARIANTS.remove(v)
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            if err > 2e-2:
                print(f"{shape} {config} {v[0]}: one layer vs loop oracle FAILED {err:.1e}", flush=True)
    use(VARIANTS[0])
    prefill_ms(dense[shape], ids)
    prefill_ms(moe, ids)
    res = {v[0]: [] for v in VARIANTS}
    for rnd in range(int(rounds)):
        d = prefill_ms(dense[shape], ids)
        for v in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:
            use(v)
            res[v[0]].append(prefill_ms(moe, ids))
        use(VARIANTS[0])
        print(f"{shape} {config} round {rnd}: dense {d:.4f} ms; " + ", ".join(f"{n} {t[-1]:.4f}" for n, t in res.items()), flush=True)
    best = min(res, key=lambda n: min(res[n]))
    print(f"{shape} {config}: best {best} {min(res[best]):.4f} ms vs base {min(res['base']):.4f} ms", flush=True)
    del moe
    torch.cuda.empty_cache()
print("done", flush=True)
