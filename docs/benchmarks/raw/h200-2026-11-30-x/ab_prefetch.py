"""Session 19: decode b=1, the GEMV op's down launch as a programmatic dependent (pdl: it asks L2
for its weights while the gate/up launch finishes) and the shared expert read into L2 beside the
attention (pfN: cmoe.prefetch, N MiB per layer; "n": the evict_normal priority instead of
evict_last). Dense and the variants alternate, each MoE time against the dense time measured just
before; dense also with pdl/prefetch settings irrelevant (its FFN is cuBLAS).

    PYTHONPATH=src:benchmarks python .carry/s19/ab_prefetch.py llama2-7b:S1A1E8:2 ...
"""
import datetime
import sys

import torch

from cmoe import bench, prefetch
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl
from torch import nn
import torch.nn.functional as F


@torch.library.custom_op("cmoe_ab::join_linear", mutates_args=())
def join_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    prefetch.join(x.device)
    return F.linear(x, w)


@join_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


class JoinLinear(nn.Module):
    """Experiment only: dense gate_proj that first joins the prefetch of its own weights."""

    def __init__(self, lin):
        super().__init__()
        self.weight = lin.weight

    def forward(self, x):
        return join_linear(x, self.weight)


def dense_prefetching(model):
    """The dense model's FFNs ask for their gate_proj/up_proj rows in L2 (the first PREFETCH_BYTES)
    at decode b=1, as the MoE layers do for their shared expert."""
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.gate_proj = JoinLinear(mlp.gate_proj)
        mlp.__dict__["l2_prefetch_weights"] = (
            lambda x, mlp=mlp: [mlp.gate_proj.weight, mlp.up_proj.weight] if x.numel() // x.shape[-1] <= 4 else [])

VARIANTS = {  # name: (GEMV_DOWN_PDL, PREFETCH_BYTES, PREFETCH_EVICT_LAST)
    "base": (False, 0, True),
    "pdl": (True, 0, True),
    "pf16": (False, 16 << 20, True),
    "pf24": (False, 24 << 20, True),
    "pf48": (False, 48 << 20, True),
    "pf24n": (False, 24 << 20, False),
    "pdl+pf24": (True, 24 << 20, True),
}


def use(v):
    te.GEMV_DOWN_PDL, prefetch.PREFETCH_BYTES, prefetch.PREFETCH_EVICT_LAST = VARIANTS[v]


def step_ms(model, b=1):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
names = [v for v in (sys.argv[1].split(",") if "," in sys.argv[1] else [])] or list(VARIANTS)
jobs = [j for j in sys.argv[1:] if ":" in j]
for job in jobs:
    shape, config, rounds = (job.split(":") + ["2"])[:3]
    dense = bench.build_dense(shape, layers=4)
    dense_pf = bench.build_dense(shape, layers=4)
    dense_prefetching(dense_pf)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, config, (2, 512))
    set_expert_impl(moe, "auto")
    for v in ("base", "pdl"):
        use(v)
        print(f"{shape} {config} {v}: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 2, 3)):.1e}", flush=True)
    use("base")
    step_ms(dense)
    for rnd in range(int(rounds)):
        d = step_ms(dense)
        use("pf24")
        try:
            dp = step_ms(dense_pf)
        except Exception as e:  # noqa: BLE001  (the experiment's wrapper only)
            print("dense+pf24 failed:", type(e).__name__, str(e)[:300], flush=True)
            dp = float("nan")
        use("base")
        line = [f"{shape} {config} round {rnd} b=1: dense {d:.4f}, dense+pf24 {dp:.4f} ({d / dp:.4f}x)"]
        for v in names if rnd % 2 == 0 else names[::-1]:
            use(v)
            t = step_ms(moe)
            line.append(f"{v} {t:.4f} ({d / t:.4f}x)")
        use("base")
        print(", ".join(line), " ms", flush=True)
    del dense, dense_pf, moe
    torch.cuda.empty_cache()
print("done", flush=True)
