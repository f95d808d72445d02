"""Session 37: the grouped_mm path with cgpatch's CUTLASS GEMMs against torch._grouped_mm's and the loop oracle."""
import sys

import torch

sys.path.insert(0, ".carry/s37/cg")
import cgpatch  # noqa: E402
import cmoe.triton_experts as te  # noqa: E402
from cmoe import experts  # noqa: E402

torch.manual_seed(0)
for (T, a, E, d, m) in ((2048, 1, 7, 4096, 1792), (2048, 2, 14, 4096, 896), (37, 2, 5, 256, 64), (1, 1, 3, 128, 64)):
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
    idx = torch.stack([torch.randperm(E - 1)[:a] for _ in range(T)]).cuda()  # the last expert gets no token
    w = torch.rand(T, a, device="cuda") + 0.5
    cgpatch.MODE = "torch"
    ref = te._grouped_mm_experts(x, idx, w, gu, dn, "silu")
    loop = experts.loop_experts(x.double(), idx, w.double(), gu.double(), dn.double(), "silu")
    for mode in ("ping_64x256_c1,coop_128x256_c1", "coop_128x256_c1,coop_128x256_c1"):
        cgpatch.MODE = mode
        out = te._grouped_mm_experts(x, idx, w, gu, dn, "silu")
        torch.cuda.synchronize()
        print(f"T={T} a={a} E={E} d={d} m={m} {mode}: bit-equal to torch._grouped_mm's path: {torch.equal(out, ref)}; "
              f"rel err vs loop {((out.double() - loop).norm() / loop.norm()).item():.2e} "
              f"(torch path {((ref.double() - loop).norm() / loop.norm()).item():.2e})", flush=True)
