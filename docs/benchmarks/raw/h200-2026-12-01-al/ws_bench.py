"""Can Triton 3.6 reach cuBLAS's rate on Hopper for the routed experts' GEMM shape? A plain GEMM
c [M, N] = a [M, K] @ b [N, K]^T on the padded rows of llama3-8b S1A1E8 at 1x2048 (M = 2688, K = 4096,
N = 3584): pointer loads, TMA tensor descriptors, and descriptors with warp specialization, against
torch.mm (cuBLAS). Each kernel checked against torch.mm."""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import cmoe.triton_experts as te


@triton.jit
def _mm_ptr(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    tm, tn = te._tile_of(tl.program_id(0), M // BM, N // BN, GROUP)
    rm = tm * BM + tl.arange(0, BM)
    rn = tn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :])
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _mm_desc(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
             WS: tl.constexpr, STAGES: tl.constexpr):
    a_d = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_d = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    tm, tn = te._tile_of(tl.program_id(0), M // BM, N // BN, GROUP)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES, warp_specialize=WS):
        a = a_d.load([tm * BM, k0])
        b = b_d.load([tn * BN, k0])
        acc = tl.dot(a, b.T, acc)
    rm = tm * BM + tl.arange(0, BM)
    rn = tn * BN + tl.arange(0, BN)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def main():
    M, K, N = 2688, 4096, 3584
    torch.manual_seed(0)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    ref = a @ b.T
    flops = 2 * M * N * K
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))

    def run(name, fn):
        try:
            c.zero_()
            fn()
            err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
            us = min(do_bench(fn, warmup=30, rep=200) for _ in range(2)) * 1e3
            print(f"{name:52s} {us:7.1f} us {flops / us / 1e6:5.0f} TFLOP/s  rel err {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:52s} FAIL {type(exc).__name__}: {str(exc)[:150]}", flush=True)

    run("cublas torch.mm", lambda: torch.mm(a, b.T, out=c))
    for bm, bn, bk, nw, ns in [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]:
        grid = ((M // bm) * (N // bn),)
        run(f"pointers ({bm},{bn},{bk}) w{nw} s{ns}",
            lambda: _mm_ptr[grid](a, b, c, M, N, K, BM=bm, BN=bn, BK=bk, GROUP=8, num_warps=nw, num_stages=ns))
        for ws in (False, True):
            run(f"descriptors ({bm},{bn},{bk}) w{nw} s{ns} ws={ws}",
                lambda: _mm_desc[grid](a, b, c, M, N, K, BM=bm, BN=bn, BK=bk, GROUP=8, WS=ws, STAGES=ns, num_warps=nw))


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    main()
