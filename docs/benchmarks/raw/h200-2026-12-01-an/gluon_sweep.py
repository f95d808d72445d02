"""The grouped path at 1x2048 (one layer's alignment, gate/up and down; imbalanced routing as the benchmark's
converted models): the Triton kernels (prefill tiles, paired) against cmoe.gluon_experts' kernels in several
tiles; each GEMM alone too. Prints us and the largest difference from the Triton path's output."""
import torch
import triton
from triton.testing import do_bench

import cmoe.gluon_experts as ge
import cmoe.triton_experts as te


def bench(fn):
    return min(do_bench(fn, warmup=20, rep=150) for _ in range(2)) * 1e3


GU_TILES = [(64, 64, 6, 8), (64, 64, 4, 8), (128, 64, 4, 8), (128, 64, 3, 8), (64, 64, 5, 4)]
DN_TILES = [(128, 64, 6, 8), (256, 64, 4, 8), (128, 64, 5, 4), (256, 64, 3, 8)]


def main(shape, cfg_name, T=2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    n_all, S, a = {"S1A1E8": (8, 1, 1), "S2A2E16": (16, 2, 2)}[cfg_name]
    m, E = f // n_all, n_all - S
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
    pop = torch.exp(0.35 * torch.randn(E, device="cuda"))
    idx = torch.multinomial(pop.expand(T, E), a, replacement=False).to(torch.int32)
    wt = torch.rand(T, a, device="cuda")
    P = T * a
    cfg = te.grouped_config(P)
    bt = cfg["bt"]
    print(f"## {shape} {cfg_name} T={T}: cfg {cfg}", flush=True)
    te.GLUON_GROUPED = False
    run = lambda: te._grouped_experts(x, idx, wt, gu, dn, "silu", cfg=cfg)  # noqa: E731
    ref = run().float()
    print(f"triton layer {bench(run):7.1f} us", flush=True)
    te.GLUON_GROUPED = True
    for gather in (False, True):
        te.GLUON_GATHER = gather
        y = run().float()
        print(f"gluon layer (default tiles, gather {'in kernel' if gather else 'pass'}) {bench(run):7.1f} us; "
              f"max diff {(y - ref).abs().max().item():.2e}, rel {((y - ref).norm() / ref.norm()).item():.1e}", flush=True)
    te.GLUON_GROUPED = te.GLUON_GATHER = False
    sorted_ids, tile_expert = te.align(idx, E, bt, 0)
    nt = tile_expert.numel()
    h = torch.empty(nt * bt, m, device="cuda", dtype=torch.bfloat16)
    yy = torch.empty(T, a, d, device="cuda", dtype=torch.bfloat16)
    print(f"gather {bench(lambda: ge.gather_rows(x, sorted_ids, a)):7.1f} us", flush=True)
    xs = ge.gather_rows(x, sorted_ids, a)
    for tile in GU_TILES:
        try:
            us = bench(lambda: ge.gate_up(xs, gu, h, tile_expert, "silu", bt, tile))
            print(f"gluon gate/up {tile} {us:7.1f} us", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"gluon gate/up {tile} FAIL {type(exc).__name__} {str(exc)[:200]}", flush=True)
    for tile in GU_TILES:
        try:
            us = bench(lambda: ge.gate_up_gathered(x, sorted_ids, a, gu, h, tile_expert, "silu", bt, tile))
            print(f"gluon gate/up gathered in kernel {tile} {us:7.1f} us", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"gluon gate/up gathered in kernel {tile} FAIL {type(exc).__name__} {str(exc)[:200]}", flush=True)
    ge.gate_up(xs, gu, h, tile_expert, "silu", bt)
    for tile in DN_TILES:
        try:
            us = bench(lambda: ge.down(h, dn, wt, yy, sorted_ids, tile_expert, P, 0, bt, tile))
            print(f"gluon down {tile} {us:7.1f} us", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"gluon down {tile} FAIL {type(exc).__name__} {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for s in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(s, c)
