"""align(): the one-program Triton kernel vs the sort-based torch ops, by number of pairs (CUDA-graph replay)."""
import torch
from bench_experts import graph_ms
from cmoe import triton_experts as te

print("#", torch.cuda.get_device_name(), torch.__version__, "; align time (us) by pairs; E=8 routed experts, top-2, bt=64")
for T in (128, 256, 512, 1024, 2048, 3072, 4096, 8192):
    idx = torch.rand(T, 8, device="cuda").argsort(1)[:, :2].contiguous()
    row = []
    for limit in (1 << 30, 0):
        te.ALIGN_KERNEL_MAX_PAIRS = limit
        row.append(graph_ms(lambda: te.align(idx, 8, 64)) * 1e3)
    print(f"pairs {2 * T}: kernel {row[0]:.1f} us, torch ops {row[1]:.1f} us", flush=True)
