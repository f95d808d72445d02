"""The decode step's attention alone: transformers' SDPA attention against cmoe.decode_attention.

    python benchmarks/bench_decode_attention.py [--shapes llama2-7b llama3-8b] [--batches 1 8 32 128 256]

Both run as the compiled decode step runs them: ``cmoe.attention``'s attention function traced by
``torch.compile(fullgraph=True)``, once with ``DECODE_KERNEL`` off (transformers' SDPA attention:
under compile it copies the cache per query head when heads are grouped, then SDPA with the boolean
mask) and once on (one Triton launch). One query token per row over a static cache of ``--cache``
positions, of which ``--filled`` are visible. Each timing replays a CUDA graph over ``--layers``
caches of their own (so that the keys and values come from HBM, not L2) and reports the median per
layer. Prints the hardware, then one row per (shape, batch): the slices the kernel cuts the cache
into, both times, their ratio, the rate at which the kernel reads the cache (GB/s), and the larger
relative error of the two outputs against SDPA in float64.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_experts import graph_ms
from cmoe import attention

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # query heads, key/value heads, head size


class _Attn(torch.nn.Module):
    """What transformers' attention functions read from the module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def time_both(mod, B: int, H: int, HKV: int, D: int, cache: int, filled: int, n: int) -> tuple[dict, float]:
    """({DECODE_KERNEL: us per layer}, max relative error of either against SDPA in float64) over n
    layers' caches of their own."""
    g = torch.Generator("cuda").manual_seed(B)
    qs = [torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(n)]
    ks = [torch.randn(B, HKV, cache, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(n)]
    vs = [torch.randn_like(k) for k in ks]
    mask = (torch.arange(cache, device="cuda") < filled).view(1, 1, 1, -1).expand(B, 1, 1, -1).contiguous()

    def layer(q, k, v, m):
        return attention.causal_sdpa_forward(mod, q, k, v, m, dropout=0.0, scaling=D**-0.5)[0]

    times, outs = {}, {}
    for on in (False, True):
        attention.DECODE_KERNEL = on
        torch._dynamo.reset()
        fn = torch.compile(layer, fullgraph=True)
        outs[on] = fn(qs[0], ks[0], vs[0], mask).float()
        times[on] = graph_ms(lambda: [fn(qs[i], ks[i], vs[i], mask) for i in range(n)], iters=1) * 1e3 / n
    attention.DECODE_KERNEL = True
    G = H // HKV
    ref = torch.nn.functional.scaled_dot_product_attention(
        qs[0].double(), ks[0].double().repeat_interleave(G, 1), vs[0].double().repeat_interleave(G, 1),
        attn_mask=mask, scale=D**-0.5).transpose(1, 2)
    return times, max(((o.double() - ref).norm() / ref.norm()).item() for o in outs.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128, 256])
    ap.add_argument("--cache", type=int, default=545, help="static cache positions (512-token prompt + 33)")
    ap.add_argument("--filled", type=int, default=530, help="visible positions")
    ap.add_argument("--layers", type=int, default=0, help="cache copies per graph (0: enough for 256 MB)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from cmoe import decode_attention as da

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; cache {args.cache}, visible {args.filled}")
    print("| shape | batch | slices | SDPA (us/layer) | decode_attention (us/layer) | speed-up | KV read at (GB/s) | max rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        H, HKV, D = SHAPES[shape]
        mod = _Attn(H // HKV)
        for B in args.batches:
            kv_bytes = 2 * B * HKV * args.cache * D * 2
            n = args.layers or max(2, min(64, (256 << 20) // kv_bytes + 1))
            times, err = time_both(mod, B, H, HKV, D, args.cache, args.filled, n)
            slices = da._slices(B * HKV, args.cache, torch.device("cuda"))[0]
            print(f"| {shape} | {B} | {slices} | {times[False]:.2f} | {times[True]:.2f} | {times[False] / times[True]:.2f}x | "
                  f"{kv_bytes / times[True] / 1e3:.0f} | {err:.1e} |", flush=True)
            torch.cuda.empty_cache()
    print(f"decode_attention: BLOCK_KEYS {da.BLOCK_KEYS}, SPLIT_PROGRAMS_PER_SM {da.SPLIT_PROGRAMS_PER_SM}, "
          f"MIN_BLOCKS_PER_SLICE {da.MIN_BLOCKS_PER_SLICE}, NUM_WARPS {da.NUM_WARPS}, NUM_STAGES {da.NUM_STAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
