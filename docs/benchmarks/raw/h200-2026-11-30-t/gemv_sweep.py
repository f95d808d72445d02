"""Session 15: the batch-1 GEMV kernels of the whole-layer GEMV op (shared gate/up launch, routed gate/up launch,
down launch) for the quarter-active configurations, per layer, over tile settings; cuBLAS GEMVs of the same bytes
for reference. 16 layer copies in turn (more than the 50 MB L2), captured in a CUDA graph, median of 5 replays.

    PYTHONPATH=src python .carry/s15/gemv_sweep.py
"""
import datetime

import torch
import triton

from cmoe import triton_experts as tx

L = 16
dt = torch.bfloat16
dev = "cuda"


def graph_time(fn, reps=5):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ts = []
    for _ in range(reps + 1):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / L)
    ts = sorted(ts[1:])
    return ts[len(ts) // 2]


def shape(name, d, f, E, S, A):
    m = f // E
    ms = S * m
    gu = [torch.randn(E - S, 2 * m, d, device=dev, dtype=dt) for _ in range(L)]
    dn = [torch.randn(E - S, d, m, device=dev, dtype=dt) for _ in range(L)]
    sgu = [torch.randn(2 * ms, d, device=dev, dtype=dt) for _ in range(L)]
    sd = [torch.randn(d, ms, device=dev, dtype=dt) for _ in range(L)]
    x = torch.randn(1, d, device=dev, dtype=dt)
    idx = torch.arange(A, device=dev, dtype=torch.int32)[None] + 1
    wt = torch.full((1, A), 1.0 / A, device=dev)
    h = torch.empty(1, S + A, m, device=dev, dtype=torch.float32)
    mb_gu = 2 * ms * d * 2 / 1e6
    mb_rgu = 2 * A * m * d * 2 / 1e6
    mb_dn = d * (ms + A * m) * 2 / 1e6
    print(f"\n## {name}: d={d} m={m} S={S} A={A}; per layer MB: shared gate/up {mb_gu:.1f}, routed gate/up {mb_rgu:.1f}, down {mb_dn:.1f}", flush=True)

    def sh(cfg):
        return lambda: [tx._gemv_gate_up_slots(x, idx, gu[i], sgu[i], h, ms, S, "silu", range(S), cfg) for i in range(L)]

    def ro(cfg):
        return lambda: [tx._gemv_gate_up_slots(x, idx, gu[i], sgu[i], h, ms, S, "silu", range(S, S + A), cfg) for i in range(L)]

    def do(cfg):
        return lambda: [tx._gemv_down_all(h, idx, wt, dn[i], sd[i], ms, S, cfg, dt) for i in range(L)]

    # cuBLAS references: x @ W.T with W of the shared gate/up's bytes; the down's bytes
    wref = [torch.randn(2 * ms, d, device=dev, dtype=dt) for _ in range(L)]
    dref = [torch.randn(d, ms + A * m, device=dev, dtype=dt) for _ in range(L)]
    hx = torch.randn(1, ms + A * m, device=dev, dtype=dt)
    t = graph_time(lambda: [x @ w.T for w in wref])
    print(f"cuBLAS x @ W.T, W [{2 * ms}, {d}]: {t:.2f} us ({mb_gu / t:.2f} TB/s)")
    t = graph_time(lambda: [hx @ w.T for w in dref])
    print(f"cuBLAS h @ Wd.T, Wd [{d}, {ms + A * m}]: {t:.2f} us ({mb_dn / t:.2f} TB/s)", flush=True)
    base = dict(tx.GEMV_CONFIG)
    for minp in (264, 528, 1056):
        tx.GEMV_MIN_PROGRAMS = minp
        for gcfg in [(2, 2048, 2), (2, 1024, 2), (4, 1024, 4), (4, 2048, 4), (1, 4096, 2), (2, 4096, 4), (8, 512, 4), (4, 512, 2), (1, 2048, 1)]:
            cfg = {"gate_up": gcfg, "down": base["down"]}
            a, b = graph_time(sh(cfg)), graph_time(ro(cfg))
            print(f"minp {minp} gate/up {gcfg}: shared {a:.2f} us ({mb_gu / a:.2f} TB/s), routed {b:.2f} us ({mb_rgu / b:.2f} TB/s)", flush=True)
        for dcfg in [(8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 1024, 4), (4, 1024, 2), (16, 512, 8), (2, 1024, 2), (8, 256, 2)]:
            cfg = {"gate_up": base["gate_up"], "down": dcfg}
            c = graph_time(do(cfg))
            print(f"minp {minp} down {dcfg}: {c:.2f} us ({mb_dn / c:.2f} TB/s)", flush=True)
    tx.GEMV_MIN_PROGRAMS = 264


print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} triton {triton.__version__}")
print(f"current: GEMV_CONFIG {tx.GEMV_CONFIG}, GEMV_MIN_PROGRAMS {tx.GEMV_MIN_PROGRAMS}")
shape("llama2-7b S1A1E8", 4096, 11008, 8, 1, 1)
shape("llama3-8b S1A1E8", 4096, 14336, 8, 1, 1)
shape("llama2-7b S2A2E16", 4096, 11008, 16, 2, 2)
shape("llama2-7b S2A2E8", 4096, 11008, 8, 2, 2)
