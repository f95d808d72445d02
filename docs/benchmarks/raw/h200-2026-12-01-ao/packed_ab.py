"""Session 36, call 4 (prototype, not library code): the packed two-stream dense path in the compiled decode step.

Importing this module patches, for an A/B with ``benchmarks/bench_ab.py`` (run through ``ab_packed.py``):
- ``cmoe.bench.convert_model_``: after converting, each CMoE layer gets packed COPIES of its weights as buffers
  (G [2ms + 2Em, d], D [d, ms + Em], R [2E, d]); the layer's own parameters stay as they are (a measurement
  only: the copies double the FFN's memory);
- ``cmoe.triton_experts.dense_moe``: with ``ON`` true, the layers that the dense path serves run
  ``s36::packed_dense`` instead: the two halves of the gate/up GEMM on two streams (the router's float32
  scores from cuBLAS before the side half), the routing finished in the activation kernel, one down GEMM."""
import sys

import torch

sys.path.insert(0, ".carry/s36")
from glu_route import glu_scores, pack, packed_split, route_scores, router_rows  # noqa: E402

import cmoe.bench as cbench  # noqa: E402
import cmoe.triton_experts as te  # noqa: E402
from cmoe.moe import moe_layers  # noqa: E402

ON = False
_SIDE = {}


@torch.library.custom_op("s36::packed_dense", mutates_args=())
def packed_dense(x: torch.Tensor, G: torch.Tensor, D: torch.Tensor, R: torch.Tensor, bias: torch.Tensor,
                 scale: torch.Tensor, ms: int, m: int, act: str, top_k: int, linear: bool) -> torch.Tensor:
    x = x.contiguous()
    E = (D.shape[1] - ms) // m
    cut = packed_split(ms, m, E)
    main = torch.cuda.current_stream(x.device)
    side = _SIDE.get(x.device) or _SIDE.setdefault(x.device, torch.cuda.Stream(x.device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        s = route_scores(x, R)
        gb = x @ G[cut:].T
    ga = x @ G[:cut].T
    main.wait_stream(side)
    s.record_stream(main)
    gb.record_stream(main)
    h = glu_scores((ga, gb), s, (None, None, bias, scale, linear), ms, m, act, top_k)
    return h @ D.T


@packed_dense.register_fake
def _(x, G, D, R, bias, scale, ms, m, act, top_k, linear):
    return torch.empty_like(x)


_dense_moe = te.dense_moe


def dense_moe(layer, x):
    if not ON or not hasattr(layer, "s36_G"):
        return _dense_moe(layer, x)
    spec = layer.spec
    if spec.top_k == 0 or not te.use_dense(x.shape[0], spec.active_size, spec.intermediate_size):
        return None
    rg, ru, bias, scale, linear = te.router_args(layer.router)
    return packed_dense(x, layer.s36_G, layer.s36_D, layer.s36_R, bias, scale, spec.shared_size, spec.expert_size,
                        te.activations.canonical(spec.act), spec.top_k, linear)


_convert = cbench.convert_model_


def convert_model_(model, *args, **kwargs):
    out = _convert(model, *args, **kwargs)
    with torch.no_grad():
        for i, layer in enumerate(moe_layers(model)):
            G, D = pack(layer.shared_gate_up.weight, layer.experts.gate_up_proj, layer.shared_down.weight,
                        layer.experts.down_proj)
            layer.register_buffer("s36_G", G.contiguous(), persistent=False)
            layer.register_buffer("s36_D", D.contiguous(), persistent=False)
            layer.register_buffer("s36_R", router_rows(te.router_args(layer.router)).contiguous(), persistent=False)
            if i == 0:
                x = torch.randn(128, G.shape[1], device=G.device, dtype=G.dtype)
                ref = _dense_moe(layer, x)
                global ON
                ON = True
                try:
                    new = dense_moe(layer, x)
                finally:
                    ON = False
                if ref is not None and new is not None:
                    err = ((new.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    print(f"# s36 packed dense path vs current dense op, layer 0, 128 tokens: max rel err {err:.2e}", flush=True)
    return out


te.dense_moe = dense_moe
cbench.convert_model_ = convert_model_
