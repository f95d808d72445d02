"""One MoE layer's routed experts + shared expert at 1x2048 (the op, as the compiled forward calls it on
the grouped path: triton_experts_op; on the rows paths: pair_rows_op then the weighted sum), in a CUDA
graph: the capacity path against the Triton grouped kernels, and the capacity path's cost of its
overflow kernels (CAPACITY_FACTOR large: no pair past C either way)."""
import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te


def bench_graph(fn):
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return min(do_bench(g.replay, warmup=30, rep=250) for _ in range(2)) * 1e3


def main(shape, cfg, T=2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    n_all, S, a = {"S1A1E8": (8, 1, 1), "S2A2E16": (16, 2, 2)}[cfg]
    m = f // n_all
    E = n_all - S
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device=dev, dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device=dev, dtype=torch.bfloat16) * 0.02
    sgu = torch.randn(2 * S * m, d, device=dev, dtype=torch.bfloat16) * 0.02
    sd = torch.randn(d, S * m, device=dev, dtype=torch.bfloat16) * 0.02
    idx = torch.stack([torch.randperm(E, device=dev)[:a] for _ in range(T)])
    w = torch.rand(T, a, device=dev)
    ref = None
    for name, settings in [("grouped (Triton)", dict(CAPACITY_MIN_ROWS=10**9)), ("capacity", {}),
                           ("capacity, factor 1.0", dict(CAPACITY_FACTOR=1.0)),
                           ("capacity, factor 1.25", dict(CAPACITY_FACTOR=1.25))]:
        old = {k: getattr(te, k) for k in settings}
        for k, v in settings.items():
            setattr(te, k, v)
        try:
            path = te._plan(T, a, S * m, m, E, te.grouped_mm_ok(x, d, m))[0]
            fn = lambda: te.triton_experts(x, idx, w, gu, dn, "silu", sgu, sd)  # noqa: E731
            out = fn()
            ref = out if ref is None else ref
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            C = te.capacity(T * a, E)
            over = int((torch.bincount(idx.view(-1), minlength=E) - C).clamp_min(0).sum())
            print(f"{shape} {cfg} {name:24s} path={path:9s} C={C} pairs past C={over:4d}  {bench_graph(fn):7.1f} us  "
                  f"rel diff vs first {err:.1e}", flush=True)
        finally:
            for k, v in old.items():
                setattr(te, k, v)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for s in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(s, c)
