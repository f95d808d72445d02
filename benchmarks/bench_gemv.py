"""The decode step's one-row pieces that both models share: the attention projections through
cmoe.gemv against cuBLAS, and the greedy argmax in two passes against torch.argmax.

    python benchmarks/bench_gemv.py [--shapes 4096x4096 6144x4096 12288x4096] [--tiles 2/2048/2 4/1024/4]

GEMV: one bf16 row times an [N, K] weight (``F.linear`` against ``cmoe.gemv.launch`` at each tile,
``cmoe.gemv.GEMV_TILE`` first). The default shapes are LLaMA-2-7B's and LLaMA-3-8B's o_proj and
fused q/k/v. Each timing replays a CUDA graph over enough copies of the weight to read 256 MB (so
that L2 holds none of them between reads) and reports the time per matrix. Argmax: compiled
(``torch.compile(fullgraph=True)``) over bf16 logits of LLaMA-2's and LLaMA-3's vocabularies, over 8
copies. Prints the hardware, one table per part, with the ratios, the read rates and the errors
against float64 (GEMV) or whether the indices are equal (argmax).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench_experts import graph_ms


def us_per_call(fns: list) -> float:
    return graph_ms(lambda: [f() for f in fns], iters=1) * 1e3 / len(fns)


def gemv_table(shapes: list[tuple[int, int]], tiles: list[tuple[int, int, int]]) -> None:
    from cmoe import gemv

    print("| weight | MB | cuBLAS (us) | tile | gemv (us) | speed-up | gemv read at (TB/s) | rel err cuBLAS / gemv |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for N, K in shapes:
        n = max(2, (256 << 20) // (N * K * 2) + 1)
        g = torch.Generator("cuda").manual_seed(N)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K**-0.5 for _ in range(n)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
        want = (x.double() @ ws[0].double().T)[0]

        def err(y):
            return ((y.double().reshape(-1) - want).norm() / want.norm()).item()

        cublas = us_per_call([lambda w=w: F.linear(x, w) for w in ws])
        mb = N * K * 2 / 1e6
        for tile in tiles:
            t = us_per_call([lambda w=w, tile=tile: gemv.launch(x[0], w, None, tile) for w in ws])
            print(f"| {N} x {K} | {mb:.1f} | {cublas:.2f} | {'/'.join(map(str, tile))} | {t:.2f} | {cublas / t:.2f}x | "
                  f"{mb / t:.2f} | {err(F.linear(x, ws[0])):.1e} / {err(gemv.launch(x[0], ws[0], None, tile)):.1e} |", flush=True)
        del ws
        torch.cuda.empty_cache()


def argmax_table(vocabs: list[int], rows: list[int]) -> None:
    from cmoe import generation

    print("| vocabulary | rows | torch.argmax (us) | argmax_last (us) | speed-up | equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    split_rows = generation.ARGMAX_SPLIT_MAX_ROWS
    generation.ARGMAX_SPLIT_MAX_ROWS = max(rows)  # the two passes at every row count, to compare
    try:
        for V in vocabs:
            for B in rows:
                xs = [torch.randn(B, V, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
                torch._dynamo.reset()
                ref = torch.compile(lambda x: x.argmax(-1), fullgraph=True)
                new = torch.compile(generation.argmax_last, fullgraph=True)
                same = all(torch.equal(ref(x), new(x)) for x in xs)
                t_ref = us_per_call([lambda x=x: ref(x) for x in xs])
                t_new = us_per_call([lambda x=x: new(x) for x in xs])
                print(f"| {V} | {B} | {t_ref:.2f} | {t_new:.2f} | {t_ref / t_new:.2f}x | {same} |", flush=True)
    finally:
        generation.ARGMAX_SPLIT_MAX_ROWS = split_rows
    print(f"argmax_last: ARGMAX_CHUNK {generation.ARGMAX_CHUNK}; the generation path takes it up to "
          f"ARGMAX_SPLIT_MAX_ROWS = {split_rows} rows")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "6144x4096", "12288x4096"], help="NxK weights")
    ap.add_argument("--tiles", nargs="*", default=[], help="BN/BK/warps tiles to time besides GEMV_TILE")
    ap.add_argument("--vocabs", nargs="+", type=int, default=[32000, 128256])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64, 128, 256])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from cmoe import gemv

    tiles = [gemv.GEMV_TILE] + [tuple(int(v) for v in t.split("/")) for t in args.tiles]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; GEMV_TILE {'/'.join(map(str, gemv.GEMV_TILE))}")
    gemv_table([tuple(int(v) for v in s.split("x")) for s in args.shapes], tiles)
    print()
    argmax_table(args.vocabs, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
