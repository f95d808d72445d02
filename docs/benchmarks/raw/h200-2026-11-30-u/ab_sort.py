"""Run u: the grouped_mm path's sort by the counting and placing kernels (sort_pairs) against the torch ops
(a 16-bit radix sort, index_add counts, scatter), which it replaced.

1. the sort alone, CUDA-graph timed, same output;
2. whole model, prefill 1x2048, S2A2E8 and S3A3E8 (the grouped_mm path), torch ops vs kernels alternating.
"""
import sys
import time

import torch
import triton

import cmoe.triton_experts as te
from cmoe import bench
from cmoe.attention import unpadded_prefill
from cmoe.fused_qkv import fused_qkv

LIMIT = te.ALIGN_KERNEL_MAX_COUNTS


def use(variant):
    te.ALIGN_KERNEL_MAX_COUNTS = 0 if variant == "torch ops" else LIMIT  # 0: sort_pairs takes the torch ops


def graph_time(fn, n=20, reps=7):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / n)
    return sorted(ts)[reps // 2]


def part1():
    print("## 1. sort_pairs alone (us per call, CUDA graph of 20 calls, median of 7)")
    print("| T | a | E | pairs | torch ops | kernels | same order, ends, pos |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, a, E in ((2048, 2, 6), (2048, 3, 5), (16384, 1, 7), (16384, 2, 14), (16384, 3, 5)):
        idx = torch.rand(T, E, device="cuda", generator=g).topk(a, dim=1).indices
        res, ts = {}, {}
        for v in ("torch ops", "kernels"):
            use(v)
            res[v] = te.sort_pairs(idx, E)
            ts[v] = graph_time(lambda: te.sort_pairs(idx, E))
        use("kernels")
        same = all(torch.equal(u.long(), w.long()) for u, w in zip(res["torch ops"], res["kernels"]))
        print(f"| {T} | {a} | {E} | {T * a} | {ts['torch ops']:.2f} | {ts['kernels']:.2f} | {same} |", flush=True)


@torch.no_grad()
def part2(names, configs, shapes=((1, 2048),), rounds=3):
    print("\n## 2. whole model (4 layers), prefill, CUDA-graph replay, median of 5 per round")
    print("| model | config | prefill | dense ms | torch ops ms | kernels ms | ops vs dense | kernels vs dense | kernels / ops |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        dense_t = {}
        model = bench.build_dense(name, layers=4)
        for b, s in shapes:
            ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
            with unpadded_prefill(), fused_qkv(model):
                fwd = bench.prefill_forward(model, ids)
                dense_t[(b, s)] = [bench.time_prefill(fwd)[0] for _ in range(rounds)]
        del model, fwd
        torch.cuda.empty_cache()
        for cfg in configs:
            model = bench.build_dense(name, layers=4)
            bench.convert_model_(model, cfg)
            for b, s in shapes:
                ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
                res = {"torch ops": [], "kernels": []}
                with unpadded_prefill(), fused_qkv(model):
                    fwd = bench.prefill_forward(model, ids)
                    for r in range(rounds):
                        for v in ("torch ops", "kernels"):
                            use(v)
                            res[v].append(bench.time_prefill(fwd)[0])
                    use("kernels")
                    out_k = fwd().logits.float()
                    use("torch ops")
                    out_t = fwd().logits.float()
                    use("kernels")
                err = ((out_k - out_t).norm() / out_t.norm()).item()
                d = sorted(dense_t[(b, s)])[rounds // 2]
                o, n = sorted(res["torch ops"])[rounds // 2], sorted(res["kernels"])[rounds // 2]
                print(f"| {name} | {cfg} | {b}x{s} | {d*1e3:.3f} | {o*1e3:.3f} | {n*1e3:.3f} | {d/o:.4f}x | {d/n:.4f}x | {o/n:.4f} |"
                      f" (rounds ops {[round(t*1e3, 3) for t in res['torch ops']]}, kernels {[round(t*1e3, 3) for t in res['kernels']]}; logits rel diff {err:.1e})", flush=True)
            del model, fwd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    print(time.strftime("# %Y-%m-%d %H:%M UTC", time.gmtime()), torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    part1()
    part2(sys.argv[1:] or ["llama2-7b", "llama3-8b"], ["S2A2E8", "S3A3E8"])
