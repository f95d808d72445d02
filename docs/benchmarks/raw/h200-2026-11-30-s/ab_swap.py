"""Session 14: decode at b=1, three orders of the GEMV path, dense and the three alternating in one
process: base (router, then one gate/up GEMV over every slot: two ops, ROUTER_BESIDE off), beside
(the committed op: router on the second stream beside the shared slots' gate/up), swap (the shared
slots' gate/up on the second stream; router then the routed slots' gate/up on the first, so that the
two GEMVs overlap).

    PYTHONPATH=src:benchmarks python .carry/s14/ab_swap.py llama2-7b S2A2E8 S1A1E8
"""
import datetime
import sys
import time

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl

SHAPE, CONFIGS = sys.argv[1], sys.argv[2:]
ROUNDS = 2


@torch.library.custom_op("cmoe_ab::gemv_swap", mutates_args=())
def gemv_swap(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, shared_gate_up: torch.Tensor,
              shared_down: torch.Tensor, router_gate: torch.Tensor, router_up: torch.Tensor, bias: torch.Tensor,
              scale: torch.Tensor, linear: bool, act: str, top_k: int) -> torch.Tensor:
    T, d = x.shape
    m = down.shape[2]
    sgu, sd = shared_gate_up.contiguous(), shared_down.contiguous()
    ms, S = te._shared_pieces((sgu, sd), m)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    h = torch.empty(T, S + top_k, m, device=x.device, dtype=torch.float32)
    idx0 = torch.zeros(T, top_k, device=x.device, dtype=torch.int64)  # not read for the shared slots
    beside = te._Beside(x)
    with torch.cuda.stream(beside.side):
        te._gemv_gate_up_slots(x, idx0, gate_up, sgu, h, ms, S, act, range(S), te.GEMV_CONFIG)
        done = beside.mark()
    idx, wt, _ = te.triton_route_op(x, router_gate, router_up, bias, scale, act, top_k, linear)
    te._gemv_gate_up_slots(x, idx, gate_up, sgu, h, ms, S, act, range(S, S + top_k), te.GEMV_CONFIG)
    beside.wait_mark(done)
    return te._gemv_down_all(h, idx, wt, down, sd, ms, S, te.GEMV_CONFIG, x.dtype)


@gemv_swap.register_fake
def _(x, *args):
    return torch.empty_like(x)


ORIG = te.gemv_moe


def swap_moe(layer, x):
    if ORIG(layer, x) is None:  # same rule
        return None
    return gemv_swap(x, *te.layer_args(layer))


def use(v):
    te.ROUTER_BESIDE = v != "base"
    te.gemv_moe = swap_moe if v == "swap" else ORIG


def step_ms(model, b: int = 1) -> float:
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


t0 = time.time()
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE}", flush=True)
dense = bench.build_dense(SHAPE, layers=4)
step_ms(dense)  # warm-up, untimed
for config in CONFIGS:
    moe = bench.build_dense(SHAPE, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    for v in ("base", "beside", "swap"):
        use(v)
        print(f"{config} {v}: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 2)):.1e}", flush=True)
    for rnd in range(ROUNDS):
        d = step_ms(dense)
        line = [f"{config} round {rnd} b=1: dense {d:.4f}"]
        for v in ("base", "beside", "swap"):
            use(v)
            t = step_ms(moe)
            line.append(f"{v} {t:.4f} ({d / t:.4f}x)")
        print(", ".join(line), f" ms  [{time.time() - t0:.0f} s]", flush=True)
    use("beside")
    del moe
    torch.cuda.empty_cache()
