"""Session 13: the router's reduce kernel, one load per slice (old) against SP slices per load (new).
1. The router op alone in a CUDA graph (16 calls per replay), d = 4096, E = 8, top-2, bf16.
2. Decode b=1 of S2A2E8, dense / old / new alternating, each MoE time against the dense time just before.

    PYTHONPATH=src:benchmarks python .carry/s13/ab_route.py llama2-7b llama3-8b
"""
import datetime
import sys

import torch
import triton
import triton.language as tl

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import set_expert_impl
from cmoe.triton_experts import _route_finish

NEW = te._route_reduce_kernel


@triton.jit
def _route_reduce_kernel(
    part_ptr, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr,
    T, rows_pad, E, SPLITS,
    A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, LINEAR: tl.constexpr,
):
    """Few tokens: sum the partial scores of every slice (fixed order: deterministic), then finish."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_e = tl.arange(0, BE)
    e_ok = offs_e < E
    g = tl.zeros((BT, BE), tl.float32)
    u = tl.zeros((BT, BE), tl.float32)
    ptr = part_ptr + rows[:, None] * BE + offs_e[None, :]
    for sp in range(SPLITS):
        g += tl.load(ptr + sp * 2 * rows_pad * BE)
        if not LINEAR:
            u += tl.load(ptr + sp * 2 * rows_pad * BE + rows_pad * BE)
    _route_finish(g, u, rows, r_ok, offs_e, e_ok, bias_ptr, scale_ptr, idx_ptr, wt_ptr, p_ptr, E, A, ACT, BE, LINEAR)


class _Old:  # launches the old kernel where the op launches the new one (without its SP)
    def __getitem__(self, grid):
        def launch(*args, SP, **kw):
            return _route_reduce_kernel[grid](*args, **kw)
        return launch


def use(v):
    te._route_reduce_kernel = _Old() if v == "old" else NEW


def router_us(T, v, d=4096, E=8, reps=16):
    use(v)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
    rg = torch.randn(E, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ru = torch.randn(E, d, device="cuda", dtype=torch.bfloat16, generator=g)
    b, s = torch.zeros(E, device="cuda"), torch.ones(E, device="cuda")
    f = lambda: te.triton_route_op(x, rg, ru, b, s, "silu", 2)
    f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            f()
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            graph.replay()
        z.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(z) * 1e3 / 20 / reps)
    return sorted(ts)[2], f()


def step_ms(model, b=1):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
for T in (1, 8, 32, 128, 256, 2048):
    (o, ro), (n, rn) = router_us(T, "old"), router_us(T, "new")
    same = torch.equal(ro[0], rn[0]) and torch.allclose(ro[1], rn[1]) and torch.allclose(ro[2], rn[2], atol=1e-6)
    print(f"router T={T}: old {o:.2f} us, new {n:.2f} us per call; same result: {same}", flush=True)
use("new")
for shape in sys.argv[1:] or ["llama2-7b"]:
    dense = bench.build_dense(shape, layers=4)
    moe = bench.build_dense(shape, layers=4)
    bench.convert_model_(moe, "S2A2E8", (2, 512))
    set_expert_impl(moe, "auto")
    print(f"{shape} S2A2E8 check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 3)):.1e}", flush=True)
    step_ms(dense)
    for rnd in range(2):
        d = step_ms(dense)
        line = [f"{shape} round {rnd} b=1: dense {d:.4f}"]
        for v in ("old", "new"):
            use(v)
            t = step_ms(moe)
            line.append(f"{v} {t:.4f} ({d / t:.4f}x)")
        use("new")
        print(", ".join(line), " ms", flush=True)
    del dense, moe
    torch.cuda.empty_cache()
