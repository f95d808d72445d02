"""A/B in one run, decode at batch 128 and 256 for every configuration of one shape:
  F  the shared expert folded into the grouped kernels (SHARED_FOLD_MAX_TOKENS=256, the current rule)
  B  cuBLAS runs it on the second stream beside the grouped kernels (SHARED_FOLD_MAX_TOKENS=64)
  D  (S3A3E8, S2A2E8 at b=128) the dense path as it runs at b=256 (DENSE_MIN_TOKENS=128)
  DB (S3A3E8, S2A2E8 at b=128) the dense path (cuBLAS on every neuron, routing as a mask) with the
     shared expert on the second stream beside it, in one opaque op (experiment defined here)
alternating per converted model; dense at the start and the end. 512-token prompt, 32 steps, 3 repeats
(the bench's decode cell). Usage: python ab_decode.py llama2-7b"""
import datetime
import sys

import torch
import triton
import triton.language as tl

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.experts import EXPERT_IMPLS, _load_triton
from cmoe.generation import time_generation
from cmoe.moe import moe_layers, set_expert_impl

NAME = sys.argv[1]
CONFIGS = sys.argv[2:] or ["S3A3E8", "S2A2E8", "S1A1E8", "S2A2E16"]
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {NAME}", flush=True)


_act = te._act


@triton.jit
def _glu_scaled_rows(gu_ptr, c_ptr, h_ptr, m, ACT: tl.constexpr, BM: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    ok = cols < m
    g = tl.load(gu_ptr + r * 2 * m + cols, mask=ok).to(tl.float32)
    u = tl.load(gu_ptr + r * 2 * m + m + cols, mask=ok).to(tl.float32)
    c = tl.load(c_ptr + r)
    tl.store(h_ptr + r * m + cols, (_act(g, ACT) * u * c).to(h_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("cmoe_exp::dense_beside", mutates_args=())
def dense_beside(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, sgu: torch.Tensor, sd: torch.Tensor, act: str) -> torch.Tensor:
    beside = te._Beside(x)
    with torch.cuda.stream(beside.side):
        extra = te.dense_expert(x, sgu, sd, act)
    T = x.shape[0]
    E, m = down.shape[0], down.shape[2]
    coef = torch.zeros(T, E, device=x.device, dtype=torch.float32).scatter_(1, idx, weight.float())
    gu = x @ gate_up.view(E * 2 * m, -1).T  # [T, E*2m]
    h = torch.empty(T, E, m, device=x.device, dtype=x.dtype)
    _glu_scaled_rows[(T * E, triton.cdiv(m, 1024))](gu, coef, h, m, ACT=te._ACT_CODE[act], BM=1024)
    y = torch.bmm(h.transpose(0, 1), down.transpose(1, 2))  # [E, T, d]
    pos = (torch.arange(E, device=x.device, dtype=torch.int32)[None] * T
           + torch.arange(T, device=x.device, dtype=torch.int32)[:, None]).reshape(-1)
    return te.sum_rows(y.view(E * T, -1), E, pos, None, beside.wait(extra))


@dense_beside.register_fake
def _(x, idx, weight, gate_up, down, sgu, sd, act):
    return torch.empty_like(x)


MODE = "F"
_load_triton()
_orig = EXPERT_IMPLS["triton"]


def _triton_exp(x, idx, weight, gate_up, down, act, sgu=None, sd=None):
    if MODE == "DB" and sgu is not None and x.shape[0] >= 128:
        return dense_beside(x, idx, weight, gate_up, down, sgu, sd, te.activations.canonical(act))
    return _orig(x, idx, weight, gate_up, down, act, sgu, sd)


EXPERT_IMPLS["triton"] = _triton_exp


def set_mode(mode):
    global MODE
    MODE = mode
    te.SHARED_FOLD_MAX_TOKENS = 64 if mode == "B" else 256
    te.DENSE_MIN_TOKENS = 128 if mode == "D" else 256


def step_ms(model, b):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


def check(model):
    """Each mode's layer output vs the loop oracle at 128 and 256 tokens (max relative error)."""
    layer = moe_layers(model)[0]
    out = []
    for T in (128, 256):
        x = torch.randn(T, layer.spec.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = layer.forward_reference(x).float()
            for mode in ("F", "B", "D", "DB"):
                set_mode(mode)
                y = layer(x).float()
                out.append(f"T={T} {mode} {((y - ref).norm() / ref.norm()).item():.1e}")
    set_mode("F")
    return ", ".join(out)


dense = bench.build_dense(NAME, layers=4)
step_ms(dense, 128)  # warm-up: the first cell of a fresh GPU runs slow
base = {b: [step_ms(dense, b)] for b in (128, 256)}
print(f"{NAME} dense: b=128 {base[128][0]:.3f} ms, b=256 {base[256][0]:.3f} ms", flush=True)
del dense
for config in CONFIGS:
    model = bench.build_dense(NAME, layers=4)
    bench.convert_model_(model, config, (2, 512))
    set_expert_impl(model, "auto")
    print(f"{NAME} {config}: oracle check {check(model)}", flush=True)
    for b in (128, 256):
        dense_path = config in ("S3A3E8", "S2A2E8")
        modes = ["F", "B", "F", "B"] + (["D", "DB", "D", "DB"] if b == 128 else ["DB", "DB"]) * dense_path
        for mode in modes:
            set_mode(mode)
            try:
                t = step_ms(model, b)
                print(f"{NAME} {config} b={b} {mode}: {t:.3f} ms ({base[b][0] / t:.3f}x dense)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{NAME} {config} b={b} {mode}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    set_mode("F")
    del model
    torch.cuda.empty_cache()
dense = bench.build_dense(NAME, layers=4)
for b in (128, 256):
    t = step_ms(dense, b)
    print(f"{NAME} dense again: b={b} {t:.3f} ms (first {base[b][0]:.3f})", flush=True)
