"""Session 37: CUTLASS 3 pointer-array grouped GEMMs (libcg.so, built here with nvcc 13.0 from the nvidia-cutlass
4.2 wheel's headers) against torch._grouped_mm, our Triton grouped kernels and cuBLAS's plain GEMMs, for the
routed experts of one layer at 1x2048 (the two llama3-8b prefill misses, and llama2-7b for reference).
One layer's GEMMs in a CUDA graph over 4 copies (weights from HBM), us per layer."""
import ctypes
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
from bench_experts import graph_ms  # noqa: E402

import cmoe.triton_experts as te  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = ctypes.CDLL(os.path.join(HERE, "libcg.so"))
CONFIGS = ["coop_128x256_c1", "ping_64x256_c1", "coop_128x256_c2", "coop_128x128_c1", "ping_128x128_c1"]
COPIES = 4
SMS = torch.cuda.get_device_properties(0).multi_processor_count
P = ctypes.c_void_p


class Grouped:
    """One CUTLASS configuration's grouped GEMM D_g = A_g @ B_g^T over G groups with fixed N, K."""

    def __init__(self, name, G, N, K):
        """N, K: ints (every group) or sequences of G ints (group g is N[g] x K[g])."""
        self.name, self.G = name, G
        N = [N] * G if isinstance(N, int) else list(N)
        K = [K] * G if isinstance(K, int) else list(K)
        f = lambda s: getattr(LIB, f"{name}_{s}")  # noqa: E731
        self._run = f("run")
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, P, ctypes.c_int, P]
        ws = f("workspace")
        ws.restype = ctypes.c_size_t
        ws.argtypes = [ctypes.c_int, ctypes.c_int]
        self.strides = torch.zeros(3, G, 64, dtype=torch.uint8, device="cuda")  # room for each stride type
        st = f("strides")
        st.argtypes = [ctypes.c_int, P, P, P, P, P]
        n, k = (ctypes.c_int * G)(*N), (ctypes.c_int * G)(*K)
        rc = st(G, ctypes.cast(n, P), ctypes.cast(k, P), *[P(self.strides[i].data_ptr()) for i in range(3)])
        assert rc == 0, rc
        self.ws = torch.empty(max(1, ws(G, torch.cuda.get_device_properties(0).multi_processor_count)), dtype=torch.uint8, device="cuda")

    def __call__(self, shapes, pa, pb, pd):
        rc = self._run(self.G, P(shapes.data_ptr()), P(pa.data_ptr()), P(self.strides[0].data_ptr()), P(pb.data_ptr()),
                       P(self.strides[1].data_ptr()), P(pd.data_ptr()), P(self.strides[2].data_ptr()),
                       P(self.ws.data_ptr()), globals()['SMS'], P(torch.cuda.current_stream().cuda_stream))
        assert rc == 0, f"{self.name}: {rc}"


def counts_for(T, a, E, skew, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.linspace(1.0, skew, E)
    p = p / p.sum()
    idx = torch.stack([torch.multinomial(p, a, replacement=False, generator=g) for _ in range(T)])
    return idx, torch.bincount(idx.flatten(), minlength=E)


def ptrs(base, offsets_rows, row_elems):
    return torch.tensor([base.data_ptr() + int(o) * row_elems * base.element_size() for o in offsets_rows],
                        dtype=torch.int64, device="cuda")


def case(shape, d, f, cfg, T=2048):
    S, A, NE = cfg
    m = f // NE
    E = NE - S
    idx, counts = counts_for(T, A, E, skew=1.5)
    rows = int(counts.sum())
    offs = torch.cumsum(counts, 0) - counts
    bf = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    L = []
    for _ in range(COPIES):
        L.append(dict(x=torch.randn(rows, d, **bf), gu=torch.randn(E, 2 * m, d, **bf) * 0.02,
                      dn=torch.randn(E, d, m, **bf) * 0.02, h=torch.randn(rows, m, **bf),
                      y1=torch.empty(rows, 2 * m, **bf), y2=torch.empty(rows, d, **bf),
                      xt=torch.randn(T, d, **bf)))
    shapes1 = torch.tensor([[int(c), 2 * m, d] for c in counts], dtype=torch.int32, device="cuda")
    shapes2 = torch.tensor([[int(c), d, m] for c in counts], dtype=torch.int32, device="cuda")
    for w in L:
        w["p1"] = (ptrs(w["x"], offs, d), torch.tensor([w["gu"][e].data_ptr() for e in range(E)], dtype=torch.int64, device="cuda"),
                   ptrs(w["y1"], offs, 2 * m))
        w["p2"] = (ptrs(w["h"], offs, m), torch.tensor([w["dn"][e].data_ptr() for e in range(E)], dtype=torch.int64, device="cuda"),
                   ptrs(w["y2"], offs, d))
    print(f"## {shape} S{S}A{A}E{NE}: {E} routed experts of {m}, top-{A}, {T} tokens -> {rows} rows, "
          f"per expert {counts.tolist()} (largest {counts.max().item() / counts.float().mean().item():.2f}x the mean)", flush=True)
    res = {}
    us = lambda fn: graph_ms(fn) * 1e3 / COPIES  # noqa: E731
    cum = torch.cumsum(counts, 0).to(torch.int32).cuda()
    w0 = L[0]
    ref1 = torch._grouped_mm(w0["x"], w0["gu"].transpose(1, 2), offs=cum)
    ref2 = torch._grouped_mm(w0["h"], w0["dn"].transpose(1, 2), offs=cum)
    res["torch._grouped_mm gate/up"] = us(lambda: [torch._grouped_mm(w["x"], w["gu"].transpose(1, 2), offs=cum) for w in L])
    res["torch._grouped_mm down"] = us(lambda: [torch._grouped_mm(w["h"], w["dn"].transpose(1, 2), offs=cum) for w in L])
    for name in CONFIGS:
        try:
            g1, g2 = Grouped(name, E, 2 * m, d), Grouped(name, E, d, m)
            g1(shapes1, *w0["p1"])
            g2(shapes2, *w0["p2"])
            torch.cuda.synchronize()
            e1 = ((w0["y1"].float() - ref1.float()).abs().max() / ref1.float().abs().max()).item()
            e2 = ((w0["y2"].float() - ref2.float()).abs().max() / ref2.float().abs().max()).item()
            t1 = us(lambda: [g1(shapes1, *w["p1"]) for w in L])
            t2 = us(lambda: [g2(shapes2, *w["p2"]) for w in L])
            res[f"CUTLASS {name} gate/up"] = t1
            res[f"CUTLASS {name} down"] = t2
            print(f"CUTLASS {name}: gate/up {t1:6.1f} us (err {e1:.1e}), down {t2:6.1f} us (err {e2:.1e}), sum {t1 + t2:6.1f}",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"CUTLASS {name}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    pad = sum(-(-int(c) // 128) * 128 for c in counts)
    xp = [torch.randn(pad, d, **bf) for _ in range(COPIES)]
    hp = [torch.randn(pad, m, **bf) for _ in range(COPIES)]
    res[f"cuBLAS plain gate/up on {pad} rows (128-row padding)"] = us(lambda: [x @ w["gu"][0].T for x, w in zip(xp, L)])
    res[f"cuBLAS plain down on {pad} rows"] = us(lambda: [h @ w["dn"][0].T for h, w in zip(hp, L)])
    # our Triton grouped path (align + gate/up + down), the routing above
    idx_d = idx.cuda()
    wt = torch.ones(T, A, device="cuda")
    res["Triton grouped path (align + gate/up + down)"] = us(
        lambda: [te._grouped_experts(w["xt"], idx_d, wt, w["gu"], w["dn"], "silu", cfg=te.grouped_config(T * A)) for w in L])
    order = (torch.argsort(idx.flatten(), stable=True) // A).cuda()  # each row's token, in the experts' order
    res["gather of x's rows (index_select)"] = us(lambda: [w["xt"].index_select(0, order) for w in L])
    for k, v in res.items():
        print(f"{k:55s} {v:7.1f} us", flush=True)


def main():
    for shape, d, f in (("llama3-8b", 4096, 14336), ("llama2-7b", 4096, 11008)):
        for cfg in ((1, 1, 8), (2, 2, 16)):
            case(shape, d, f, cfg)


if __name__ == "__main__":
    main()
