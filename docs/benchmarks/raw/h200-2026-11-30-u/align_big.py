"""Run u: the parallel alignment kernels against the sort-based torch ops (the path beyond ALIGN_KERNEL_MAX_COUNTS)."""
import time

import torch
import triton

import cmoe.triton_experts as te


def graph_time(fn, n=10, reps=7):
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


print(time.strftime("# %Y-%m-%d %H:%M UTC", time.gmtime()), torch.cuda.get_device_name(), torch.__version__, triton.__version__)
print("| T | a | E | pairs | kernels (us) | torch ops (us) | torch / kernels | same rows |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
g = torch.Generator(device="cuda").manual_seed(0)
limit = te.ALIGN_KERNEL_MAX_COUNTS
for T in (2048, 4096, 16384, 65536):
    for a, E in ((1, 7), (2, 14), (4, 64)):
        idx = torch.rand(T, E, device="cuda", generator=g).topk(a, dim=1).indices
        P = T * a
        bt = te.grouped_config(P)["bt"]
        te.ALIGN_KERNEL_MAX_COUNTS = 1 << 40
        k = te.align(idx, E, bt)
        tk = graph_time(lambda: te.align(idx, E, bt))
        te.ALIGN_KERNEL_MAX_COUNTS = 0
        o = te.align(idx, E, bt)
        to = graph_time(lambda: te.align(idx, E, bt))
        te.ALIGN_KERNEL_MAX_COUNTS = limit
        used = int((o[1] >= 0).sum())
        same = torch.equal(o[1], k[1]) and torch.equal(o[0][:used * bt], k[0][:used * bt])
        print(f"| {T} | {a} | {E} | {P} | {tk:.2f} | {to:.2f} | {to / tk:.2f}x | {same} |", flush=True)
