"""A/B: the dense path's second stream (router and shared expert beside the routed GEMM) on or off.

    python ab_stream.py 0|1 <bench_speed arguments>
"""
import sys

import cmoe.triton_experts as te
from cmoe.bench import main

te.SHARED_STREAM = sys.argv[1] == "1"
print(f"SHARED_STREAM = {te.SHARED_STREAM}", flush=True)
sys.exit(main(sys.argv[2:]))
