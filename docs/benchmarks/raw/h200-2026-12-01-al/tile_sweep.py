"""The grouped kernels' tiles at 1x2048 (gate/up and down of one layer's routed experts, top-1 or top-2
over 7 or 14 experts, uniform random routing), each timed alone (do_bench, L2 flushed)."""
import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te


def bench(fn):
    return min(do_bench(fn, warmup=30, rep=200) for _ in range(2)) * 1e3


def main(shape, cfg_name, T=2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    n_all, S, a = {"S1A1E8": (8, 1, 1), "S2A2E16": (16, 2, 2)}[cfg_name]
    m, E = f // n_all, n_all - S
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
    idx = torch.stack([torch.randperm(E, device="cuda")[:a] for _ in range(T)]).to(torch.int32)
    wt = torch.rand(T, a, device="cuda")
    bt = 128
    sorted_ids, tile_expert = te.align(idx, E, bt, 0)
    nt = tile_expert.numel()
    h = torch.empty(nt * bt, m, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(T, a, d, device="cuda", dtype=torch.bfloat16)
    P = T * a
    fl_gu, fl_dn = 2 * P * d * 2 * m, 2 * P * d * m
    ref_h = ref_y = None
    for bn, bk, nw, ns in [(128, 64, 8, 4), (64, 64, 4, 4), (64, 64, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4)]:
        def g():
            te._grouped_gate_up[(nt * triton.cdiv(m, bn),)](x, gu, gu, h, sorted_ids, tile_expert, P, d, m, 0, nt, A=a, S=0,
                ACT=0, BT=bt, BN=bn, BK=bk, GROUP=8, UPCAST=False, IEEE=False, num_warps=nw, num_stages=ns)
        try:
            g()
            ok = sorted_ids < P
            ref_h = h[ok].clone() if ref_h is None else ref_h
            same = torch.equal(h[ok], ref_h)
            us = bench(g)
            print(f"{shape} {cfg_name} gate/up {(bn, bk, nw, ns)}  {us:7.1f} us {fl_gu / us / 1e6:5.0f} TFLOP/s same={same}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{shape} {cfg_name} gate/up {(bn, bk, nw, ns)} FAIL {type(exc).__name__} {str(exc)[:100]}", flush=True)
    for bn, bk, nw, ns in [(256, 64, 8, 4), (128, 64, 4, 4), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 4)]:
        def dd():
            te._grouped_down[(nt * triton.cdiv(d, bn),)](h, dn, dn, wt, y, sorted_ids, tile_expert, P, d, m, 0, nt, a, 0, A=a,
                S=0, BT=bt, BN=bn, BK=bk, GROUP=8, UPCAST=False, IEEE=False, num_warps=nw, num_stages=ns)
        try:
            dd()
            ref_y = y.clone() if ref_y is None else ref_y
            same = torch.equal(y, ref_y)
            us = bench(dd)
            print(f"{shape} {cfg_name} down    {(bn, bk, nw, ns)}  {us:7.1f} us {fl_dn / us / 1e6:5.0f} TFLOP/s same={same}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{shape} {cfg_name} down {(bn, bk, nw, ns)} FAIL {type(exc).__name__} {str(exc)[:100]}", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for s in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(s, c)
