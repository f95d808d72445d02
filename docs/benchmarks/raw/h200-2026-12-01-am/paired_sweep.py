"""The grouped path (alignment, gate/up, down) at prefill sizes with the gate/up kernel's two products
(current config) against one product over interleaved gate/up rows (``paired``), several tiles; imbalanced
routing as the benchmark's converted models. Prints us per layer, the gate/up kernel alone, and the
largest difference from the current config's output."""
import sys
import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te


def bench(fn):
    return min(do_bench(fn, warmup=20, rep=150) for _ in range(2)) * 1e3


def cands(base):
    out = [("current", base)]
    d128 = base["down"]
    for bt, gu, dn in [(128, (64, 64, 4, 4), d128), (128, (64, 64, 4, 3), d128), (128, (64, 64, 8, 4), d128),
                       (128, (128, 64, 8, 4), d128), (128, (128, 64, 8, 3), d128), (128, (64, 128, 4, 3), d128),
                       (64, (128, 64, 4, 4), (256, 64, 4, 4)), (64, (64, 64, 4, 4), (128, 64, 4, 4)),
                       (64, (128, 64, 4, 4), (128, 64, 4, 4))]:
        out.append((f"paired bt={bt} gu={gu} dn={dn}", dict(bt=bt, gate_up=gu, down=dn, paired=True)))
    return out


def main(shape, cfg_name, T):
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
    base = te.grouped_config(P)
    counts = torch.bincount(idx.view(-1), minlength=E)
    print(f"## {shape} {cfg_name} T={T}: largest expert {counts.max().item() * E / P:.2f}x the average; current {base}", flush=True)
    ref = None
    fl = 2 * P * d * 3 * m
    for name, cfg in cands(base):
        try:
            run = lambda: te._grouped_experts(x, idx, wt, gu, dn, "silu", cfg=cfg)  # noqa: E731
            y = run().float()
            ref = y if ref is None else ref
            err = (y - ref).abs().max().item()
            us = bench(run)
            sorted_ids, tile_expert = te.align(idx, E, cfg["bt"], 0)
            nt = tile_expert.numel()
            h = torch.empty(nt * cfg["bt"], m, device="cuda", dtype=torch.bfloat16)
            bn, bk, nw, ns = cfg["gate_up"]
            g = lambda: te._grouped_gate_up[(nt * triton.cdiv(m, bn),)](  # noqa: E731
                x, gu, gu, h, sorted_ids, tile_expert, P, d, m, 0, nt, A=a, S=0, ACT=0, BT=cfg["bt"], BN=bn, BK=bk, GROUP=8,
                UPCAST=False, IEEE=False, PAIRED=cfg.get("paired", False), EVEN_K=d % bk == 0, num_warps=nw, num_stages=ns)
            ug = bench(g)
            print(f"{name:58s} layer {us:7.1f} us {fl / us / 1e6:4.0f} TFLOP/s; gate/up {ug:7.1f} us; max diff {err:.2e}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:58s} FAIL {type(exc).__name__} {str(exc)[:120]}", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for T in (2048, 16384):
        for s in ("llama3-8b", "llama2-7b"):
            for c in ("S1A1E8", "S2A2E16"):
                main(s, c, T)
