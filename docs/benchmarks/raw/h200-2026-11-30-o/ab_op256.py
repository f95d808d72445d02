"""A/B in one run, decode at batch 256, llama2-7b S3A3E8: the dense path as torch ops (D,
DENSE_OP_MAX_TOKENS=128) and as the one op (DF, 256), alternating; dense before (warmed up)."""
import datetime
import torch
from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)


def step_ms(model, b=256):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


model = bench.build_dense("llama2-7b", layers=4)
step_ms(model, 128)
d0 = step_ms(model)
print(f"dense b=256: {d0:.3f} ms", flush=True)
bench.convert_model_(model, "S3A3E8", (2, 512))
set_expert_impl(model, "auto")
for mode, op_max in (("D", 128), ("DF", 256), ("D", 128), ("DF", 256)):
    te.DENSE_OP_MAX_TOKENS = op_max
    t = step_ms(model)
    print(f"S3A3E8 b=256 {mode}: {t:.3f} ms ({d0 / t:.3f}x dense)", flush=True)
