"""A warp-specialized persistent GEMM in Gluon for Hopper, C [M, N] = A [M, K] @ B [N, K]^T in bf16, on the
routed gate/up GEMM's padded shape of run al (llama3-8b S1A1E8 at 1x2048: 2688 x 3584 x 4096) and its down
GEMM (2688 x 4096 x 1792), against cuBLAS and a plain Triton tl.dot GEMM. One loader warp streams A and B
tiles by TMA into a ring of STAGES buffers ("ready" barriers); the default partition (num_warps warps) runs
the wgmma chain, keeps one wgmma in flight and hands each buffer back ("empty" barriers), and writes each
tile by TMA. Tiles are walked persistently, M fastest, so that the programs of one wave share B's columns.
A measurement for the next step of issue 3 (session 34); not library code.

    python gluon_ws.py            # on the H200: check against torch, time
    python gluon_ws.py --compile  # anywhere: compile for sm_90 only (Triton 3.6)
"""
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, num_m, K, STAGES: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    i = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_m = (t % num_m) * BM
        off_n = (t // num_m) * BN
        for k in range(0, K, BK):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # the first round passes: phase 0 is not done
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, k], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [off_n, k], ready.index(s), b_bufs.index(s))
            i += 1


@gluon.constexpr_function
def _acc_layout(BM, BN, num_warps):
    warps = [4, 1]
    while warps[0] * warps[1] < num_warps:
        if BM > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    n = min(256, BN // warps[1])
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


@gluon.jit
def _mma(c_desc, a_bufs, b_bufs, c_smem, ready, empty, num_tiles, num_m, K, STAGES: gl.constexpr,
         num_warps: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_bufs.type.shape[2]
    layout: gl.constexpr = _acc_layout(BM, BN, num_warps)
    i = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        acc = gl.zeros([BM, BN], gl.float32, layout)
        for k in range(0, K, BK):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=k > 0, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=k > 0)  # the wgmma before this one is done
            i += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES))
        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [(t % num_m) * BM, (t // num_m) * BN], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def gemm_ws_kernel(a_desc, b_desc, c_desc, num_tiles, num_m, K, STAGES: gl.constexpr, num_warps: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize([
        (_mma, (c_desc, a_bufs, b_bufs, c_smem, ready, empty, num_tiles, num_m, K, STAGES, num_warps)),
        (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, num_m, K, STAGES)),
    ], [1], [40])


def descriptors(a, b, c, BM, BN, BK):
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)  # noqa: E731
    return (TensorDescriptor.from_tensor(a, [BM, BK], lay([BM, BK])), TensorDescriptor.from_tensor(b, [BN, BK], lay([BN, BK])),
            TensorDescriptor.from_tensor(c, [BM, BN], lay([BM, BN])))


def gemm_ws(a, b, c, BM, BN, BK, STAGES, num_warps=8, sms=132):
    M, K = a.shape
    num_m = triton.cdiv(M, BM)
    num_tiles = num_m * triton.cdiv(b.shape[0], BN)
    gemm_ws_kernel[(min(sms, num_tiles),)](*descriptors(a, b, c, BM, BN, BK), num_tiles, num_m, K, STAGES=STAGES,
                                           num_warps=num_warps)


@triton.jit
def _plain_mm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    rm = (pid % num_m) * BM + tl.arange(0, BM)
    rn = (pid // num_m) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        acc = tl.dot(tl.load(a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]),
                     tl.load(b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]), acc)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 6, 8), (128, 128, 64, 5, 4), (256, 128, 64, 3, 8)]


def compile_only():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    for BM, BN, BK, ST, nw in CONFIGS:
        a = torch.empty(2688, 4096, dtype=torch.bfloat16)
        b = torch.empty(3584, 4096, dtype=torch.bfloat16)
        c = torch.empty(2688, 3584, dtype=torch.bfloat16)
        descs = descriptors(a, b, c, BM, BN, BK)
        sig = {name: mangle_type(d) for name, d in zip(("a_desc", "b_desc", "c_desc"), descs)}
        sig.update(num_tiles="i32", num_m="i32", K="i32", STAGES="constexpr", num_warps="constexpr")
        src = GluonASTSource(gemm_ws_kernel, sig, constexprs={"STAGES": ST, "num_warps": nw})
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
            print(f"ok   {(BM, BN, BK, ST, nw)}: {k.metadata.shared} bytes of shared memory", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL {(BM, BN, BK, ST, nw)}: {type(exc).__name__} {str(exc)[:2000]}", flush=True)


def bench(fn):
    return min(triton.testing.do_bench(fn, warmup=30, rep=200) for _ in range(2)) * 1e3


def main():
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    for name, M, N, K in [("gate/up", 2688, 3584, 4096), ("down", 2688, 4096, 1792)]:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        ref = a @ b.T
        fl = 2 * M * N * K
        us = bench(lambda: torch.mm(a, b.T, out=c))
        print(f"{name} {M}x{N}x{K} cublas                      {us:7.1f} us {fl / us / 1e6:4.0f} TFLOP/s", flush=True)
        us = bench(lambda: _plain_mm[(triton.cdiv(M, 128) * triton.cdiv(N, 256),)](a, b, c, M, N, K, BM=128, BN=256, BK=64,
                                                                                     num_warps=8, num_stages=4))
        print(f"{name} triton tl.dot (128, 256, 64) w8 s4       {us:7.1f} us {fl / us / 1e6:4.0f} TFLOP/s", flush=True)
        for cfg in CONFIGS:
            BM, BN, BK, ST, nw = cfg
            try:
                c.zero_()
                gemm_ws(a, b, c, BM, BN, BK, ST, nw, sms)
                torch.cuda.synchronize()
                err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
                us = bench(lambda: gemm_ws(a, b, c, BM, BN, BK, ST, nw, sms))
                print(f"{name} gluon ws {cfg}          {us:7.1f} us {fl / us / 1e6:4.0f} TFLOP/s  rel err {err:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} gluon ws {cfg} FAIL {type(exc).__name__} {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
