"""Session 17: does the prefill time drift with the GPU's clock? llama2-7b 4 layers, 1x2048, dense and S1A1E8.
Prints per-replay times (ms) in phases, with nvidia-smi sampling clocks/power in the background (smi.csv)."""
import os, subprocess, sys, time
import torch
from cmoe import bench
from cmoe.attention import unpadded_prefill
from cmoe.fused_qkv import fused_qkv

OUT = os.environ.get("OUT", ".")
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                        "--format=csv", "-lms", "50"], stdout=open(f"{OUT}/smi.csv", "w"))
T0 = time.time()

def capture(fwd):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fwd(); fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fwd()
    torch.cuda.synchronize()
    return g

def times(g, n):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); g.replay(); b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]

def show(label, ts):
    k = len(ts)
    q = sorted(ts)
    print(f"{label} t={time.time()-T0:6.1f}s n={k} first5={[round(t,3) for t in ts[:5]]} med={q[k//2]:.3f} min={q[0]:.3f} max={q[-1]:.3f} "
          f"blocks of 20: {[round(sorted(ts[i:i+20])[len(ts[i:i+20])//2],3) for i in range(0, k, 20)]}", flush=True)

@torch.no_grad()
def main():
    graphs = {}
    keep = []
    for cfg in ["dense", "S1A1E8"]:
        m = bench.build_dense("llama2-7b", layers=4)
        if cfg != "dense":
            bench.convert_model_(m, cfg)
        ids = torch.randint(0, m.config.vocab_size, (1, 2048), device="cuda")
        with unpadded_prefill(), fused_qkv(m):
            fwd = bench.prefill_forward(m, ids)
            graphs[cfg] = capture(fwd)
        keep.append((m, ids, fwd))
    for rep in range(2):
        for cfg, g in graphs.items():
            time.sleep(2)
            show(f"[idle 2s] {cfg:8s} 1+5 (as bench)", times(g, 6)[1:])
            time.sleep(2)
            show(f"[idle 2s] {cfg:8s} 300 back-to-back", times(g, 300))
    # alternating, one replay each, after idle and sustained
    for rep in range(2):
        time.sleep(2)
        res = {c: [] for c in graphs}
        for i in range(150):
            for c, g in graphs.items():
                res[c] += times(g, 1)
        for c in graphs:
            show(f"[alternating r{rep}] {c:8s}", res[c])
        d = sorted(res["dense"])[75]
        print("  ratios (median):", {c: round(d / sorted(v)[75], 4) for c, v in res.items()}, flush=True)
    smi.terminate()

main()
