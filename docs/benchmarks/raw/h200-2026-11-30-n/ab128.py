"""A/B in one run: decode at batch 128 on the grouped kernels (DENSE_MIN_TOKENS=256, the current rule)
and on the dense path (DENSE_MIN_TOKENS=128), alternating G, D, G, D per converted model; dense baseline
before and after. Same settings as bench_speed's decode cells (512-token prompt, 32 steps, 3 repeats)."""
import sys, time, datetime
import torch
from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.experts import _load_triton
from cmoe.moe import set_expert_impl

B = int(sys.argv[1]) if len(sys.argv) > 1 else 128
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} decode b={B}", flush=True)


def step_ms(model):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, B, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


for name in ("llama2-7b", "llama3-8b"):
    model = bench.build_dense(name, layers=4)
    d0 = step_ms(model)
    print(f"{name} dense: {d0:.3f} ms", flush=True)
    del model
    for config in ("S3A3E8", "S2A2E8"):
        model = bench.build_dense(name, layers=4)
        bench.convert_model_(model, config, (2, 512))
        _load_triton()
        set_expert_impl(model, "auto")
        res = []
        for path, dmin in (("grouped", 256), ("dense-path", 128), ("grouped", 256), ("dense-path", 128)):
            te.DENSE_MIN_TOKENS = dmin
            t = step_ms(model)
            res.append((path, t))
            print(f"{name} {config} {path}: {t:.3f} ms ({d0 / t:.3f}x dense)", flush=True)
        te.DENSE_MIN_TOKENS = 256
        del model
    model = bench.build_dense(name, layers=4)
    d1 = step_ms(model)
    print(f"{name} dense again: {d1:.3f} ms", flush=True)
    del model
    torch.cuda.empty_cache()
