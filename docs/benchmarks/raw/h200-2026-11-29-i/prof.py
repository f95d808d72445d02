"""Kernel profile of one FFN layer at prefill sizes: the grouped_mm path and the Triton grouped path."""
import sys
import torch
from bench_experts import capture, make_moe
from cmoe import triton_experts as te
from cmoe.bench import profile_kernels

d, f = 4096, 11008
print("#", torch.cuda.get_device_name(), torch.__version__)
for preset in ("S3A3E8", "S1A1E8"):
    layers = [make_moe(d, f, preset) for _ in range(4)]
    x = torch.randn(2048, d, device="cuda", dtype=torch.bfloat16)
    for label, rows in (("grouped_mm", 0), ("triton grouped", 1 << 30)):
        te.GROUPED_MM_MIN_ROWS = rows
        def run():
            for lay in layers:
                lay(x)
        with torch.no_grad():
            g = capture(run)
            profile_kernels(g.replay, 5, print, f"{preset} T=2048 {label} (4 layers)", top=14)
    del layers
    torch.cuda.empty_cache()
