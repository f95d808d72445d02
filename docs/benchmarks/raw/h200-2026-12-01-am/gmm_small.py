"""torch._grouped_mm at 1x2048 with each expert spread over k groups (cmoe.experts.spread_groups), so that
its sm90 dispatch takes the kernel for small groups (64x128x128 ping-pong) instead of 128x256x64; against
k = 1 and the Triton grouped kernels, gate/up and down of one layer, imbalanced routing (largest expert
about 1.5x the average, as the benchmark's converted models). Prints us and TFLOP/s over the tokens."""
import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te
from cmoe import experts


def bench(fn):
    return min(do_bench(fn, warmup=30, rep=200) for _ in range(2)) * 1e3


def main(shape, cfg, T=2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    n_all, S, a = {"S1A1E8": (8, 1, 1), "S2A2E16": (16, 2, 2)}[cfg]
    m, E = f // n_all, n_all - S
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
    pop = torch.exp(0.35 * torch.randn(E, device="cuda"))
    idx = torch.multinomial(pop.expand(T, E), a, replacement=False).to(torch.int32)
    wt = torch.rand(T, a, device="cuda")
    P = T * a
    tokens, ends, _ = te.sort_pairs(idx, E)
    xs = x.index_select(0, tokens)
    h = torch.randn(P, m, device="cuda", dtype=torch.bfloat16)
    fl_gu, fl_dn = 2 * P * d * 2 * m, 2 * P * d * m
    counts = torch.bincount(idx.view(-1), minlength=E)
    print(f"## {shape} {cfg}: largest expert {counts.max().item() * E / P:.2f}x the average", flush=True)
    ref = None
    for k in (1, 2, 3, 4, 6, 8):
        try:
            b, offs = experts.spread_groups(gu, ends, k)
            bd, offs_d = experts.spread_groups(dn, ends, k)
        except ValueError:
            continue
        out = experts.grouped_mm(xs, b, offs)
        ref = out if ref is None else ref
        t1 = bench(lambda: experts.grouped_mm(xs, b, offs))
        t2 = bench(lambda: experts.grouped_mm(h, bd, offs_d))
        print(f"grouped_mm k={k} ({b.shape[0]} groups, {P // b.shape[0]} rows each): gate/up {t1:6.1f} us "
              f"{fl_gu / t1 / 1e6:4.0f} TFLOP/s, down {t2:6.1f} us {fl_dn / t2 / 1e6:4.0f}, sum {t1 + t2:6.1f}; "
              f"same as k=1: {torch.equal(out, ref)}", flush=True)
    sorted_ids, tile_expert = te.align(idx, E, 128, 0)
    nt = tile_expert.numel()
    hh = torch.empty(nt * 128, m, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(T, a, d, device="cuda", dtype=torch.bfloat16)
    t1 = bench(lambda: te._grouped_gate_up[(nt * triton.cdiv(m, 128),)](
        x, gu, gu, hh, sorted_ids, tile_expert, P, d, m, 0, nt, A=a, S=0, ACT=0, BT=128, BN=128, BK=64, GROUP=8,
        UPCAST=False, IEEE=False, num_warps=8, num_stages=4))
    t2 = bench(lambda: te._grouped_down[(nt * triton.cdiv(d, 256),)](
        hh, dn, dn, wt, y, sorted_ids, tile_expert, P, d, m, 0, nt, a, 0, A=a, S=0, BT=128, BN=256, BK=64, GROUP=8,
        UPCAST=False, IEEE=False, num_warps=8, num_stages=4))
    print(f"triton grouped: gate/up {t1:6.1f} us {fl_gu / t1 / 1e6:4.0f} TFLOP/s, down {t2:6.1f} us "
          f"{fl_dn / t2 / 1e6:4.0f}, sum {t1 + t2:6.1f}", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for s in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(s, c)
