"""A/B in one run: decode at batch 128 with the shared expert folded into the grouped kernels
(SHARED_FOLD_MAX_TOKENS=256, the current rule) and run by cuBLAS on the second stream beside them
(SHARED_FOLD_MAX_TOKENS=64), alternating F, S, F, S; dense before. 512-token prompt, 32 steps, 3 repeats."""
import datetime
import torch
from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.experts import _load_triton
from cmoe.moe import set_expert_impl

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} decode b=128", flush=True)


def step_ms(model):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, 128, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


for name, config in (("llama2-7b", "S3A3E8"), ("llama3-8b", "S2A2E8")):
    model = bench.build_dense(name, layers=4)
    d0 = step_ms(model)
    print(f"{name} dense: {d0:.3f} ms", flush=True)
    bench.convert_model_(model, config, (2, 512))
    _load_triton()
    set_expert_impl(model, "auto")
    for how, fold in (("folded", 256), ("beside", 64), ("folded", 256), ("beside", 64)):
        te.SHARED_FOLD_MAX_TOKENS = fold
        try:
            t = step_ms(model)
            print(f"{name} {config} shared {how}: {t:.3f} ms ({d0 / t:.3f}x dense)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name} {config} shared {how}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    te.SHARED_FOLD_MAX_TOKENS = 256
    del model
    torch.cuda.empty_cache()
