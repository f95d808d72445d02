"""Session 24: what inductor's coordinate-descent tuning does with a one-row matmul (dense's FFN
at decode batch 1), against cuBLAS and cmoe.gemv at several tiles, weights out of L2. Writes the
generated kernels and their tuned configs under $OUT/cd_code.

    PYTHONPATH=src:benchmarks python .carry/s24/probe_cd_gemv.py
"""
import glob
import os
import shutil
import sys

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/ic_cache")
import torch
import torch._inductor.config as ic
import torch.nn.functional as F

from bench_gemv import us_per_call
from cmoe import gemv

OUT = os.environ.get("OUT", "/tmp/out")
SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (5504, 4096), (4096, 2752), (2752, 4096)]
TILES = [gemv.GEMV_TILE, (1, 4096, 4), (1, 4096, 8), (1, 2048, 4), (2, 4096, 4), (4, 2048, 4), (4, 1024, 4), (1, 1024, 2), (8, 512, 4)]

print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
print("| weight | MB | cuBLAS us | inductor cd us | TB/s cd | best gemv tile | gemv us | all tiles (us) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for N, K in SHAPES:
    n = max(2, (256 << 20) // (N * K * 2) + 1)
    g = torch.Generator("cuda").manual_seed(N + K)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K**-0.5 for _ in range(n)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
    torch._dynamo.reset()
    with ic.patch(coordinate_descent_tuning=True):
        f = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
        y = f(x, ws[0])
        ref = F.linear(x, ws[0])
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        t_cd = us_per_call([lambda w=w: f(x, w) for w in ws])
    t_cb = us_per_call([lambda w=w: F.linear(x, w) for w in ws])
    res = {t: us_per_call([lambda w=w, t=t: gemv.launch(x[0], w, None, t) for w in ws]) for t in TILES}
    best = min(res, key=res.get)
    mb = N * K * 2 / 1e6
    print(f"| {N} x {K} | {mb:.1f} | {t_cb:.2f} | {t_cd:.2f} (err {err:.1e}) | {mb / t_cd:.2f} | {'/'.join(map(str, best))} | {res[best]:.2f} | "
          + ", ".join(f"{'/'.join(map(str, t))} {v:.2f}" for t, v in res.items()) + " |", flush=True)
    del ws
    torch.cuda.empty_cache()

dst = os.path.join(OUT, "cd_code")
os.makedirs(dst, exist_ok=True)
for p in glob.glob(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "**", "*"), recursive=True):
    if p.endswith((".best_config", ".py")) and os.path.getsize(p) < 200_000:
        shutil.copy(p, os.path.join(dst, os.path.basename(os.path.dirname(p)) + "_" + os.path.basename(p)))
print("copied", len(os.listdir(dst)), "files")
