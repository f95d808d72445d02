"""Run u: the parallel alignment kernels against the code before (d33d0bd).

1. align alone: the old one-program kernel vs the new count + place kernels (same output), CUDA-graph timed.
2. whole model, prefill 1x2048: dense, then S1A1E8 and S2A2E16 with the old align vs the new one,
   alternating, each capture fresh.
"""
import sys
import time

import torch
import triton
import triton.language as tl

import cmoe.triton_experts as te
from cmoe.triton_experts import _pair_experts  # noqa: F401  (the old kernel's helper)
from cmoe import bench
from cmoe.attention import unpadded_prefill
from cmoe.fused_qkv import fused_qkv

@triton.jit
def _align_kernel(
    idx_ptr, sorted_ptr, tile_expert_ptr,  # idx [T, A] (routed); sorted [max_tiles * BT]; tile_expert [max_tiles]
    P, NE, max_tiles,
    A: tl.constexpr, S: tl.constexpr, BT: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr, TB: tl.constexpr,
):
    """One program: pairs grouped by virtual expert (stable), each group padded to a multiple of BT
    with the sentinel P; tile_expert[i] = virtual expert of tile i, -1 past the last tile. Every
    step works on all experts at once ([CHUNK, EB] blocks), so its time does not grow with E."""
    offs_e = tl.arange(0, EB)
    counts = tl.zeros((EB,), tl.int32)
    for start in range(0, P, CHUNK):  # pass 1: pairs per expert
        p = start + tl.arange(0, CHUNK)
        ok = p < P
        hit = (_pair_experts(idx_ptr, p, ok, A, S)[:, None] == offs_e[None, :]) & ok[:, None]
        counts += tl.sum(hit.to(tl.int32), 0)
    ntiles = (counts + BT - 1) // BT
    tile_end = tl.cumsum(ntiles, 0)
    first = (tile_end - ntiles) * BT  # first row of each expert's tiles
    seen = tl.zeros((EB,), tl.int32)
    for start in range(0, P, CHUNK):  # pass 2: each pair's row = first row of its expert + its rank
        p = start + tl.arange(0, CHUNK)
        ok = p < P
        hit = ((_pair_experts(idx_ptr, p, ok, A, S)[:, None] == offs_e[None, :]) & ok[:, None]).to(tl.int32)
        rank = tl.cumsum(hit, 0) - 1 + seen[None, :] + first[None, :]
        tl.store(sorted_ptr + tl.sum(hit * rank, 1), p, mask=ok)
        seen += tl.sum(hit, 0)
    pad = tl.arange(0, BT)  # the padding rows of each expert's last tile
    tl.store(sorted_ptr + (first + counts)[:, None] + pad[None, :], P + tl.zeros((EB, BT), tl.int32),
             mask=pad[None, :] < (ntiles * BT - counts)[:, None])
    for t0 in range(0, max_tiles, TB):
        tt = t0 + tl.arange(0, TB)
        e = tl.sum((tile_end[None, :] <= tt[:, None]).to(tl.int32), 1)  # experts whose tiles end before tt
        tl.store(tile_expert_ptr + tt, tl.where(e < NE, e, -1), mask=tt < max_tiles)



def old_align(idx, num_experts, bt, shared=0):
    T, a = idx.shape
    NE, P = shared + num_experts, T * (shared + a)
    max_tiles = triton.cdiv(P, bt) + NE
    assert P <= 8192
    sorted_ids = torch.empty(max_tiles * bt, device=idx.device, dtype=torch.int32)
    tile_expert = torch.empty(max_tiles, device=idx.device, dtype=torch.int32)
    eb = max(16, triton.next_power_of_2(NE))
    chunk = max(16, min(triton.next_power_of_2(P), 8192 // eb))
    _align_kernel[(1,)](idx, sorted_ids, tile_expert, P, NE, max_tiles, A=a, S=shared, BT=bt, CHUNK=chunk, EB=eb,
                        TB=max(16, min(triton.next_power_of_2(max_tiles), 8192 // eb)), num_warps=4)
    return sorted_ids, tile_expert


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
    print("## 1. align alone (us per call, CUDA graph of 20 calls, median of 7)")
    print("| case | T | a | E | S | P | bt | old | new | same output |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [("S1A1E8 b=32", 32, 1, 7, 1), ("S1A1E8 b=128", 128, 1, 7, 1), ("S1A1E8 b=256", 256, 1, 7, 1),
             ("S2A2E16 b=32", 32, 2, 14, 2), ("S2A2E16 b=128", 128, 2, 14, 2), ("S2A2E16 b=256", 256, 2, 14, 2),
             ("S3A3E8 b=32", 32, 3, 5, 3), ("S1A1E8 1x2048", 2048, 1, 7, 0), ("S2A2E16 1x2048", 2048, 2, 14, 0),
             ("S2A2E8 1x2048", 2048, 2, 6, 0), ("S3A3E8 1x2048", 2048, 3, 5, 0), ("E=64 top-4 2048", 2048, 4, 64, 0)]
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, T, a, E, S in cases:
        idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:a] for _ in range(T)])
        P = T * (S + a)
        bt = te.grouped_config(P)["bt"]
        o, n = old_align(idx, E, bt, S), te.align(idx, E, bt, S)
        used = int((o[1] >= 0).sum())  # rows of unused tiles are never read
        same = torch.equal(o[1], n[1]) and torch.equal(o[0][:used * bt], n[0][:used * bt])
        to = graph_time(lambda: old_align(idx, E, bt, S))
        tn = graph_time(lambda: te.align(idx, E, bt, S))
        print(f"| {label} | {T} | {a} | {E} | {S} | {P} | {bt} | {to:.2f} | {tn:.2f} | {same} |", flush=True)


def old_code():
    """The code before: the old one-program align."""
    return {"align": old_align}


@torch.no_grad()
def part2(names, configs, shapes=((1, 2048),), rounds=3):
    print("\n## 2. whole model (4 layers), prefill, CUDA-graph replay, median of 5; old = d33d0bd's one-program align")
    print("| model | config | prefill | dense ms | old ms | new ms | old vs dense | new vs dense | new / old |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    new_fns = {"align": te.align}
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
                res = {"old": [], "new": []}
                with unpadded_prefill(), fused_qkv(model):
                    fwd = bench.prefill_forward(model, ids)
                    for r in range(rounds):
                        for variant in ("old", "new"):
                            fns = old_code() if variant == "old" else new_fns
                            for k, v in fns.items():
                                setattr(te, k, v)
                            res[variant].append(bench.time_prefill(fwd)[0])
                    for k, v in new_fns.items():
                        setattr(te, k, v)
                    # the new code's output equals the old one's up to rounding of the sum
                    out_new = fwd().logits.float()
                    for k, v in old_code().items():
                        setattr(te, k, v)
                    out_old = fwd().logits.float()
                    for k, v in new_fns.items():
                        setattr(te, k, v)
                err = ((out_new - out_old).norm() / out_old.norm()).item()
                d = sorted(dense_t[(b, s)])[rounds // 2]
                o, n = sorted(res["old"])[rounds // 2], sorted(res["new"])[rounds // 2]
                print(f"| {name} | {cfg} | {b}x{s} | {d*1e3:.3f} | {o*1e3:.3f} | {n*1e3:.3f} | {d/o:.4f}x | {d/n:.4f}x | {o/n:.4f} |"
                      f" (rounds old {[round(t*1e3, 3) for t in res['old']]}, new {[round(t*1e3, 3) for t in res['new']]}; logits new vs old rel {err:.1e})", flush=True)
            del model, fwd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    print(time.strftime("# %Y-%m-%d %H:%M UTC", time.gmtime()), torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    part1()
    names = sys.argv[1:] or ["llama2-7b", "llama3-8b"]
    part2(names, ["S1A1E8", "S2A2E16"])
