"""Session 37: the whole routed + shared FFN at prefill sizes with the shared expert folded into the CUTLASS launches
(cgpatch.FOLD) against the torch grouped_mm path (cuBLAS shared expert) and the loop oracle."""
import sys

import torch

sys.path.insert(0, ".carry/s37/cg")
import cgpatch  # noqa: E402
import cmoe.triton_experts as te  # noqa: E402
from cmoe import experts  # noqa: E402

te.GROUPED_MM_MIN_ROWS = 128
torch.manual_seed(0)
for (T, a, E, d, m, ms) in ((2048, 1, 7, 4096, 1792, 1792), (2048, 2, 14, 4096, 896, 1792), (700, 2, 5, 256, 64, 136)):
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
    sgu = torch.randn(2 * ms, d, device="cuda", dtype=torch.bfloat16) * 0.02
    sd = torch.randn(d, ms, device="cuda", dtype=torch.bfloat16) * 0.02
    idx = torch.stack([torch.randperm(E - 1)[:a] for _ in range(T)]).cuda()  # the last expert gets no token
    w = torch.rand(T, a, device="cuda") + 0.5
    loop = experts.loop_experts(x.double(), idx, w.double(), gu.double(), dn.double(), "silu")
    loop = loop + experts.loop_experts(x.double(), torch.zeros(T, 1, dtype=torch.long, device="cuda"), torch.ones(T, 1, device="cuda", dtype=torch.float64),
                                       sgu.double()[None], sd.double()[None], "silu")
    res = {}
    for name, mode, fold in (("torch", "torch", False), ("cutlass", "ping_64x256_c1,ping_64x256_c1", False),
                             ("cutlass+fold", "ping_64x256_c1,ping_64x256_c1", True)):
        cgpatch.MODE, cgpatch.FOLD = mode, fold
        out = te.triton_experts_op(x, idx, w, gu, dn, "silu", sgu, sd).sum(1)
        torch.cuda.synchronize()
        res[name] = out
        print(f"T={T} a={a} E={E} m={m} ms={ms} {name}: rel err vs loop {((out.double() - loop).norm() / loop.norm()).item():.2e}, "
              f"max rel diff vs torch path {((out.float() - res['torch'].float()).abs().max() / res['torch'].float().abs().max()).item():.2e}",
              flush=True)
