"""Session 38: where call 1's fold layer goes wrong: each piece against torch at llama2-7b S3A3E8, 128 tokens."""
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s38/cg")
from bench_experts import SHAPES, make_moe  # noqa: E402
import cgpatch  # noqa: E402
import cmoe.triton_experts as te  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


torch.manual_seed(0)
for shape, preset, T in (("llama2-7b", "S3A3E8", 128), ("llama3-8b", "S1A1E8", 2048), ("llama3-8b", "S3A3E8", 128)):
    d, f = SHAPES[shape]
    mod = make_moe(d, f, preset)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu_w, dn_w, sgu, sd, rg, ru, bias, scale, linear, act, a = te.layer_args(mod)
    print(shape, preset, T, "sgu", tuple(sgu.shape), sgu.is_contiguous(), "gu", tuple(gu_w.shape), gu_w.is_contiguous(),
          "sd", tuple(sd.shape), sd.is_contiguous(), "dn", tuple(dn_w.shape), dn_w.is_contiguous(), gu_w.dtype, flush=True)
    idx, wt, _ = te.triton_route_op(x, rg, ru, bias, scale, act, a, linear)
    tokens, ends, pos = te.sort_pairs(idx, gu_w.shape[0])
    xg = x.index_select(0, tokens)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
    for c in ("ping_64x256_c1", "coop_128x256_c1"):
        g0, g = cgpatch.fold_mm(x, sgu, xg, gu_w, ends, c)
        torch.cuda.synchronize()
        g_ref = torch.cat([xg[s:e] @ gu_w[i].T for i, (s, e) in enumerate(zip(starts, ends.tolist()))])
        print(f"  {c}: shared gate/up {rel(g0, x @ sgu.T):.1e}, routed gate/up {rel(g, g_ref):.1e}", flush=True)
        h0, h = te.glu(g0, act), te.glu(g, act)
        y0, rows = cgpatch.fold_mm(h0, sd, h, dn_w, ends, c)
        torch.cuda.synchronize()
        r_ref = torch.cat([h[s:e] @ dn_w[i].T for i, (s, e) in enumerate(zip(starts, ends.tolist()))])
        print(f"  {c}: shared down {rel(y0, h0 @ sd.T):.1e}, routed down {rel(rows, r_ref):.1e}", flush=True)
        out = te.sum_rows(rows, a, pos, wt, y0)
        with torch.no_grad():
            oracle = mod.forward_reference(x)
        print(f"  {c}: layer vs oracle {rel(out, oracle):.1e}", flush=True)
