"""cuBLAS's pointer-array batched GEMM (cublasGemmBatchedEx, through ctypes) over the Triton path's
tiles: each 128-row tile of the expert-sorted, padded rows is one batch entry whose weight pointer is
its expert's (computed on the device), so it adapts to imbalanced routing as the Triton kernels do.
Timed against the Triton grouped kernels on the same tiles, gate/up and down alone, llama3-8b and
llama2-7b S1A1E8/S2A2E16 at 1x2048, with the benchmark models' imbalance (counts drawn with max/mean
about 1.5)."""
import ctypes
import glob
import os

import torch
import triton
from triton.testing import do_bench

import cmoe.triton_experts as te


def load_cublas():
    roots = [os.path.dirname(torch.__file__)]
    try:
        import nvidia  # noqa: F401
        roots += list(nvidia.__path__)
    except ImportError:
        pass
    for root in roots:
        for pat in ("**/libcublas.so.*",):
            for f in sorted(glob.glob(os.path.join(root, pat), recursive=True)):
                if "Lt" not in os.path.basename(f):
                    return ctypes.CDLL(f)
    return ctypes.CDLL("libcublas.so")


CUBLAS = load_cublas()
OP_N, OP_T, R_16BF, COMPUTE_32F, GEMM_DEFAULT = 0, 1, 14, 68, -1


def batched(c_ptrs, a_ptrs, w_ptrs, n_out, rows, k, batch):
    """For each b: C_b [rows, n_out] = A_b [rows, k] @ W_b^T (W_b [n_out, k]), all row-major bf16."""
    handle = ctypes.c_void_p(torch.cuda.current_blas_handle())
    CUBLAS.cublasSetStream_v2(handle, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    st = CUBLAS.cublasGemmBatchedEx(
        handle, OP_T, OP_N, n_out, rows, k, ctypes.byref(one),
        ctypes.c_void_p(w_ptrs.data_ptr()), R_16BF, k,
        ctypes.c_void_p(a_ptrs.data_ptr()), R_16BF, k, ctypes.byref(zero),
        ctypes.c_void_p(c_ptrs.data_ptr()), R_16BF, n_out, batch, COMPUTE_32F, GEMM_DEFAULT)
    assert st == 0, f"cublasGemmBatchedEx status {st}"


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
    # imbalanced routing: expert popularity from a lognormal, max/mean about 1.5 as in the benchmark's models
    pop = torch.exp(0.35 * torch.randn(E, device="cuda"))
    idx = torch.multinomial(pop.expand(T, E), a, replacement=False).to(torch.int32)
    wt = torch.rand(T, a, device="cuda")
    P = T * a
    counts = torch.bincount(idx.view(-1), minlength=E)
    bt = 128
    sorted_ids, tile_expert = te.align(idx, E, bt, 0)
    nt = tile_expert.numel()
    used = int((tile_expert >= 0).sum())
    print(f"## {shape} {cfg_name}: counts {counts.tolist()} (max/mean {counts.max().item() * E / P:.2f}); "
          f"tiles {used} used of {nt}", flush=True)
    fl_gu, fl_dn = 2 * P * d * 2 * m, 2 * P * d * m
    # Triton
    h = torch.empty(nt * bt, m, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(T, a, d, device="cuda", dtype=torch.bfloat16)

    def tri_gu():
        te._grouped_gate_up[(nt * triton.cdiv(m, 128),)](x, gu, gu, h, sorted_ids, tile_expert, P, d, m, 0, nt, A=a, S=0,
            ACT=0, BT=bt, BN=128, BK=64, GROUP=8, UPCAST=False, IEEE=False, num_warps=8, num_stages=4)

    def tri_dn():
        te._grouped_down[(nt * triton.cdiv(d, 256),)](h, dn, dn, wt, y, sorted_ids, tile_expert, P, d, m, 0, nt, a, 0, A=a,
            S=0, BT=bt, BN=256, BK=64, GROUP=8, UPCAST=False, IEEE=False, num_warps=8, num_stages=4)
    t_gu, t_dn = bench(tri_gu), bench(tri_dn)
    print(f"triton grouped gate/up {t_gu:7.1f} us {fl_gu / t_gu / 1e6:5.0f} TFLOP/s   down {t_dn:7.1f} us "
          f"{fl_dn / t_dn / 1e6:5.0f} TFLOP/s   sum {t_gu + t_dn:7.1f}", flush=True)
    # cuBLAS pointer-array batched over the same tiles (only the used tiles: a static version would run all nt)
    xs = torch.zeros(nt * bt, d, device="cuda", dtype=torch.bfloat16)
    ok = sorted_ids < P
    xs[ok] = x[(sorted_ids[ok] // a).long()]
    gu_out = torch.empty(nt * bt, 2 * m, device="cuda", dtype=torch.bfloat16)
    hh = torch.randn(nt * bt, m, device="cuda", dtype=torch.bfloat16)
    dn_out = torch.empty(nt * bt, d, device="cuda", dtype=torch.bfloat16)
    el = 2
    tiles = torch.arange(nt, device="cuda", dtype=torch.int64)
    e_t = tile_expert.long().clamp_min(0)
    for label, nb in (("used tiles", used), ("all tiles (static)", nt)):
        a_ptrs = xs.data_ptr() + tiles[:nb] * bt * d * el
        w_ptrs = gu.data_ptr() + e_t[:nb] * 2 * m * d * el
        c_ptrs = gu_out.data_ptr() + tiles[:nb] * bt * 2 * m * el
        batched(c_ptrs, a_ptrs, w_ptrs, 2 * m, bt, d, nb)
        torch.cuda.synchronize()
        # check one used tile against torch
        b0 = 0
        ref = xs[:bt] @ gu[int(e_t[b0])].T
        err = ((gu_out[:bt].float() - ref.float()).norm() / ref.float().norm()).item()
        t1 = bench(lambda: batched(c_ptrs, a_ptrs, w_ptrs, 2 * m, bt, d, nb))
        ha = hh.data_ptr() + tiles[:nb] * bt * m * el
        wd = dn.data_ptr() + e_t[:nb] * d * m * el
        cd = dn_out.data_ptr() + tiles[:nb] * bt * d * el
        t2 = bench(lambda: batched(cd, ha, wd, d, bt, m, nb))
        print(f"cublas batched, {label:18s} gate/up {t1:7.1f} us {fl_gu / t1 / 1e6:5.0f} TFLOP/s   down {t2:7.1f} us "
              f"{fl_dn / t2 / 1e6:5.0f} TFLOP/s   sum {t1 + t2:7.1f}  (gate/up rel err {err:.1e})", flush=True)
    g = torch.cuda.CUDAGraph()
    a_ptrs = xs.data_ptr() + tiles * bt * d * el
    w_ptrs = gu.data_ptr() + e_t * 2 * m * d * el
    c_ptrs = gu_out.data_ptr() + tiles * bt * 2 * m * el
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        batched(c_ptrs, a_ptrs, w_ptrs, 2 * m, bt, d, nt)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        batched(c_ptrs, a_ptrs, w_ptrs, 2 * m, bt, d, nt)
    print(f"cublas batched gate/up in a CUDA graph {bench(g.replay):7.1f} us", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for sh in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(sh, c)
