"""A/B prepared in session 11 for the next GPU session (not run yet): decode at b=128 and b=256, one
converted configuration (default llama2-7b S3A3E8, the cells that stay ~1 % under dense), dense and
MoE variants alternating in one process, each MoE time against the dense time measured just before.

Variants (no library change; each is a setting or a stream swapped in from here):
  base  the final code;
  R1    the router in one kernel at these sizes (ROUTE_SPLIT_MAX_TOKENS 64 instead of 4096);
  HP    the dense path's second stream (router, shared expert) at high priority.

    PYTHONPATH=src:benchmarks python .carry/s11/ab_next.py [llama2-7b S3A3E8]
    PYTHONPATH=src:benchmarks python .carry/s11/ab_next.py llama2-7b S2A2E8 prefill   # 1x2048: base, HP
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

SHAPE, CONFIG = (sys.argv[1:3] + ["llama2-7b", "S3A3E8"][len(sys.argv[1:3]):])
SPLIT = te.ROUTE_SPLIT_MAX_TOKENS


def step_ms(model, b: int) -> float:
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


def variant(name: str) -> None:
    te.ROUTE_SPLIT_MAX_TOKENS = 64 if name == "R1" else SPLIT
    te._SIDE_STREAMS.clear()
    if name == "HP":
        dev = torch.device("cuda", torch.cuda.current_device())
        te._SIDE_STREAMS[dev] = torch.cuda.Stream(dev, priority=-1)


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE} {CONFIG}",
      flush=True)
dense = bench.build_dense(SHAPE, layers=4)
moe = bench.build_dense(SHAPE, layers=4)
bench.convert_model_(moe, CONFIG, (2, 512))
set_expert_impl(moe, "auto")
print(f"check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(128, 256)):.1e}", flush=True)


def prefill_ms(model, b: int = 1, s: int = 2048) -> float:
    from cmoe.attention import unpadded_prefill

    torch._dynamo.reset()
    torch.cuda.empty_cache()
    ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
    with unpadded_prefill():
        return bench.time_prefill(bench.prefill_forward(model, ids))[0] * 1e3


if sys.argv[3:] == ["prefill"]:
    prefill_ms(dense)  # warm-up, untimed
    for rnd in range(2):
        d = prefill_ms(dense)
        line = [f"round {rnd} prefill 1x2048: dense {d:.3f}"]
        for v in ("base", "HP"):
            variant(v)
            t = prefill_ms(moe)
            line.append(f"{v} {t:.3f} ({d / t:.3f}x)")
        variant("base")
        print(", ".join(line), " ms", flush=True)
    sys.exit(0)
step_ms(dense, 128)  # warm-up, untimed
for rnd in range(2):
    for b in (128, 256):
        d = step_ms(dense, b)
        line = [f"round {rnd} b={b}: dense {d:.3f}"]
        for v in ("base", "R1", "HP"):
            variant(v)
            t = step_ms(moe, b)
            line.append(f"{v} {t:.3f} ({d / t:.3f}x)")
        variant("base")
        print(", ".join(line), " ms", flush=True)
