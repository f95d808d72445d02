"""Session 35, call 6: the router op alone (llama2-7b S3A3E8's router: E = 5, top-3, d = 4,096), in a CUDA graph over
4 copies, one launch (tickets) against the partial and reduce kernels; us per call."""
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
from bench_experts import graph_ms  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
bf = dict(device="cuda", dtype=torch.bfloat16)
for E, a in ((5, 3), (6, 2), (7, 1)):
    for T in (8, 32, 128, 256, 2048):
        torch.manual_seed(0)
        xs = [torch.randn(T, 4096, **bf) for _ in range(4)]
        rs = [(torch.randn(E, 4096, **bf), torch.randn(E, 4096, **bf), torch.zeros(E, device="cuda"), torch.zeros(E, device="cuda"))
              for _ in range(4)]
        res = {}
        for one in (False, True):
            te.ROUTE_ONE_LAUNCH = one
            outs = [te.triton_route_op(x, *r, "silu", a, False) for x, r in zip(xs, rs)]
            us = graph_ms(lambda: [te.triton_route_op(x, *r, "silu", a, False) for x, r in zip(xs, rs)]) * 1e3 / 4
            res[one] = (us, outs)
        same = all(torch.equal(p, q) for o0, o1 in zip(res[False][1], res[True][1]) for p, q in zip(o0, o1))
        print(f"E={E} top-{a} T={T:5d}: two kernels {res[False][0]:6.2f} us, one launch {res[True][0]:6.2f} us, equal {same}", flush=True)
te.ROUTE_ONE_LAUNCH = True
