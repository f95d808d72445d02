"""A/B in one run, decode at batch 128, S3A3E8 and S2A2E8 of both shapes:
  F   the current rule (grouped kernels, the shared expert folded in)
  D   the dense path (cuBLAS on every neuron, the routing as a mask; DENSE_MIN_TOKENS=128), compiled torch ops
  DF  the dense path as one opaque op (experiment defined here): the router and then the shared expert on a
      second stream, beside the routed experts' gate/up GEMM on the current one; the routing applied in one
      kernel (act * up * weight, read from idx/weight); the down projections as one bmm; one kernel sums the
      experts' rows and the shared expert's output.
Alternating F, D, DF, F, D, DF; dense at the start and the end; a profile of one step (llama2-7b S3A3E8) on
dense, F, D and DF. Usage: python ab_dense.py"""
import datetime

import torch
import triton
import triton.language as tl

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.generation import time_generation
from cmoe.moe import moe_layers, set_expert_impl

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
_act = te._act


@triton.jit
def _glu_routed(gu_ptr, idx_ptr, wt_ptr, h_ptr, m, E, A: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr):
    """h[t, e] = act(g) * u * w(t, e), [g; u] = gu[t, e*2m : (e+1)*2m]; w = the routing weight of e if t chose it, else 0."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1)
    cols = tl.program_id(2) * BM + tl.arange(0, BM)
    ok = cols < m
    c = 0.0
    for k in tl.static_range(A):
        c += tl.where(tl.load(idx_ptr + t * A + k) == e, tl.load(wt_ptr + t * A + k), 0.0)
    base = (t * E + e) * 2 * m
    g = tl.load(gu_ptr + base + cols, mask=ok).to(tl.float32)
    u = tl.load(gu_ptr + base + m + cols, mask=ok).to(tl.float32)
    tl.store(h_ptr + (t * E + e) * m + cols, (_act(g, ACT) * u * c).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_experts(y_ptr, extra_ptr, out_ptr, T, d, E: tl.constexpr, BD: tl.constexpr):
    """out[t] = extra[t] + sum_e y[e, t], in float32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = cols < d
    acc = tl.load(extra_ptr + t * d + cols, mask=ok).to(tl.float32)
    for e in tl.static_range(E):
        acc += tl.load(y_ptr + (e * T + t) * d + cols, mask=ok).to(tl.float32)
    tl.store(out_ptr + t * d + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("cmoe_exp::dense_moe", mutates_args=())
def dense_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, sgu: torch.Tensor, sd: torch.Tensor,
              rgate: torch.Tensor, rup: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, linear: bool,
              act: str, top_k: int) -> torch.Tensor:
    T, d = x.shape
    E, m = down.shape[0], down.shape[2]
    cuda = x.is_cuda
    main = torch.cuda.current_stream(x.device) if cuda else None
    side = te._Beside(x).side
    routed = torch.cuda.Event() if cuda else None
    with torch.cuda.stream(side):
        idx, wt, _ = te.triton_route_op(x, rgate, rup, bias, scale, act, top_k, linear)
        if cuda:
            routed.record(side)
        extra = te.dense_expert(x, sgu, sd, act)
    gu = x @ gate_up.view(E * 2 * m, d).T  # [T, E*2m]
    if cuda:
        main.wait_event(routed)
        idx.record_stream(main)
        wt.record_stream(main)
    h = torch.empty(T, E, m, device=x.device, dtype=x.dtype)
    _glu_routed[(T, E, triton.cdiv(m, 1024))](gu, idx, wt, h, m, E, A=top_k, ACT=te._ACT_CODE[act], BM=1024)
    y = torch.bmm(h.transpose(0, 1), down.transpose(1, 2))  # [E, T, d]
    if cuda:
        main.wait_stream(side)
        extra.record_stream(main)
    out = torch.empty_like(x)
    _sum_experts[(T, triton.cdiv(d, 1024))](y, extra, out, T, d, E=E, BD=1024)
    return out


@dense_moe.register_fake
def _(x, *args):
    return torch.empty_like(x)


MODE = "F"
_masked = te.masked_moe


def _layer(layer, x):
    if MODE == "DF" and x.shape[0] >= 128 and layer.spec.shared_size:
        return dense_moe(x, layer.experts.gate_up_proj, layer.experts.down_proj, layer.shared_gate_up.weight,
                         layer.shared_down.weight, *te.router_args(layer.router), te.activations.canonical(layer.spec.act),
                         layer.spec.top_k)
    return _masked(layer, x)


te.masked_moe = _layer


def set_mode(mode):
    global MODE
    MODE = mode
    te.DENSE_MIN_TOKENS = 128 if mode == "D" else 256


def step_ms(model, b=128):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()
    return time_generation(model, b, 512, new_tokens=32, compile=True, repeats=3).decode_s * 1e3


def check(model):
    layer = moe_layers(model)[0]
    out = []
    for T in (128, 131):
        x = torch.randn(T, layer.spec.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = layer.forward_reference(x).float()
            for mode in ("F", "D", "DF"):
                set_mode(mode)
                y = layer(x).float()
                out.append(f"T={T} {mode} {((y - ref).norm() / ref.norm()).item():.1e}")
    set_mode("F")
    return ", ".join(out)


def profile(model, label):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    step_ms(model)
    bench.profile_decode(model, 128, 512, 32, lambda s: print(f"[{label}] {s}", flush=True), n=4)


for name in ("llama2-7b", "llama3-8b"):
    dense = bench.build_dense(name, layers=4)
    step_ms(dense)  # warm-up
    d0 = step_ms(dense)
    print(f"{name} dense: {d0:.3f} ms", flush=True)
    if name == "llama2-7b":
        profile(dense, "dense")
    del dense
    for config in ("S3A3E8", "S2A2E8"):
        model = bench.build_dense(name, layers=4)
        bench.convert_model_(model, config, (2, 512))
        set_expert_impl(model, "auto")
        print(f"{name} {config}: oracle check {check(model)}", flush=True)
        for mode in ("F", "D", "DF", "F", "D", "DF"):
            set_mode(mode)
            try:
                t = step_ms(model)
                print(f"{name} {config} b=128 {mode}: {t:.3f} ms ({d0 / t:.3f}x dense)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name} {config} b=128 {mode}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        if name == "llama2-7b" and config == "S3A3E8":
            for mode in ("F", "D", "DF"):
                set_mode(mode)
                profile(model, f"{config} {mode}")
        set_mode("F")
        del model
        torch.cuda.empty_cache()
    dense = bench.build_dense(name, layers=4)
    print(f"{name} dense again: {step_ms(dense):.3f} ms (first {d0:.3f})", flush=True)
    del dense
