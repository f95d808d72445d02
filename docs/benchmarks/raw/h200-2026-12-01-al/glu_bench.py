"""The activation kernel (_glu_rows) alone, in a CUDA graph, at the shapes the model runs it: the dense
path's routed rows (b=128/256, every token for every routed expert, with the routing weights) and the
shared expert's rows, and prefill's (shared expert at 1x2048 and 8x2048, grouped_mm rows), llama2-7b and
llama3-8b; the tile before run al (1 row x 1024 columns) against others."""
import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te

TILES = [(1, 1024), (4, 512), (2, 1024), (8, 256), (4, 1024)]


def graph_time(fn):
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return min(do_bench(g.replay, warmup=30, rep=150) for _ in range(2)) * 1e3


def case(label, R, m, routing=None):
    gu = torch.randn(R, 2 * m, device="cuda", dtype=torch.bfloat16)
    ref, times = None, []
    for tile in TILES:
        te.GLU_TILE = tile
        out = te.glu(gu, "silu", routing)
        ref = out if ref is None else ref
        assert torch.equal(out, ref), (label, tile)
        times.append(graph_time(lambda: te.glu(gu, "silu", routing)))
    mb = R * 3 * m * 2 / 1e6
    print(f"{label:44s} R={R:6d} m={m:5d} {mb:6.1f} MB  " + "  ".join(f"{t}: {us:6.2f} us" for t, us in zip(TILES, times)),
          flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for name, f in (("llama2-7b", 11008), ("llama3-8b", 14336)):
        m8 = f // 8
        for T in (128, 256):
            idx = torch.stack([torch.randperm(5, device="cuda")[:3] for _ in range(T)])
            wt = torch.rand(T, 3, device="cuda")
            case(f"{name} S3A3E8 b={T} dense path, routed", T * 5, m8, (idx, wt))
            case(f"{name} S3A3E8 b={T} shared", T, 3 * m8)
            idx2 = torch.stack([torch.randperm(6, device="cuda")[:2] for _ in range(T)])
            case(f"{name} S2A2E8 b={T} dense path, routed", T * 6, m8, (idx2, wt[:, :2].contiguous()))
        case(f"{name} S1A1E8 1x2048 shared", 2048, m8)
        case(f"{name} S2A2E8 1x2048 grouped_mm rows", 4096, m8)
        case(f"{name} S3A3E8 8x2048 grouped_mm rows", 49152, m8)
    te.GLU_TILE = (4, 512)
