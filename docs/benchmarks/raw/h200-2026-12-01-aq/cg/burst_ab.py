"""Session 38: bench_ab.py with cgpatch's CUTLASS GEMMs installed and, with BURST=1, each prefill timed in a
burst instead of as the sustained rate under the power cap: after 0.5 s idle, 3 untimed replays (about 10 ms),
then 5 replays timed one by one by CUDA events; the median. Tests whether the CUTLASS path's per-kernel gain
(run ap) shows in the forward when the GPU is not at its power cap."""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, "benchmarks")
import cgpatch  # noqa: E402,F401
import bench_ab  # noqa: E402
import cmoe.bench  # noqa: E402


def burst_time(fn, min_calls=1, settle_s=0.3, block_s=0.5, device="cuda"):
    torch.cuda.synchronize()
    time.sleep(0.5)
    for _ in range(3):
        fn()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(ts)


if os.environ.get("BURST") == "1":
    cmoe.bench.block_time = burst_time
sys.exit(bench_ab.main(sys.argv[1:]))
