"""Session 22, call 1: (a) greedy argmax over a vocabulary, compiled: torch.argmax against
cmoe.generation.argmax_last; (b) one-row GEMV: cuBLAS (F.linear) against cmoe.gemv's kernel at
several tiles, on the attention projections' shapes. Weights rotate over copies of >= 256 MB so
that L2 holds none of them between reads; times per matrix, CUDA-graph replay."""
import datetime
import sys

import torch
import torch.nn.functional as F
import triton.testing

from cmoe import gemv
from cmoe.generation import argmax_last

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
dev, bf = "cuda", torch.bfloat16


def us(fn, n):
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3 / n


# (a) argmax
for V in (32000, 128256):
    for B in (1, 8, 256):
        xs = [torch.randn(B, V, device=dev, dtype=bf) for _ in range(8)]
        ref = torch.compile(lambda x: x.argmax(-1), fullgraph=True)
        new = torch.compile(argmax_last, fullgraph=True)
        ok = all(torch.equal(ref(x), new(x)) for x in xs)
        t_ref = us(lambda: [ref(x) for x in xs], len(xs))
        t_new = us(lambda: [new(x) for x in xs], len(xs))
        print(f"argmax B={B} V={V}: torch.argmax {t_ref:.2f} us, argmax_last {t_new:.2f} us ({t_ref / t_new:.2f}x), equal {ok}", flush=True)

# (b) GEMV
tiles = [tuple(int(v) for v in t.split("/")) for t in (sys.argv[1] if len(sys.argv) > 1 else
         "2/2048/2,4/1024/4,8/512/4,4/2048/4,8/1024/4,16/512/8,2/4096/4,1/4096/4,4/512/2,8/256/2").split(",")]
for N, K in ((4096, 4096), (6144, 4096), (12288, 4096), (1024, 4096)):
    n = max(2, int(256e6 // (N * K * 2)))
    ws = [torch.randn(N, K, device=dev, dtype=bf) * 0.02 for _ in range(n)]
    x = torch.randn(1, K, device=dev, dtype=bf)
    mb = N * K * 2 / 1e6
    want = (x.double() @ ws[0].double().T)[0]
    t_cb = us(lambda: [F.linear(x, w) for w in ws], n)
    err_cb = ((F.linear(x, ws[0])[0].double() - want).abs().max() / want.abs().max()).item()
    line = [f"GEMV [{N} x {K}] {mb:.1f} MB: cuBLAS {t_cb:.2f} us ({mb / t_cb:.2f} TB/s, err {err_cb:.1e})"]
    best = None
    for tile in tiles:
        t = us(lambda: [gemv.launch(x[0], w, None, tile) for w in ws], n)
        err = ((gemv.launch(x[0], ws[0], None, tile).double() - want).abs().max() / want.abs().max()).item()
        line.append(f"  {tile}: {t:.2f} us ({mb / t:.2f} TB/s, {t_cb / t:.3f}x cuBLAS, err {err:.1e})")
        best = min(best or (t, tile), (t, tile))
    line.append(f"  best {best[1]}: {best[0]:.2f} us, {t_cb / best[0]:.3f}x cuBLAS")
    print("\n".join(line), flush=True)
    del ws
    torch.cuda.empty_cache()
print("done", flush=True)
