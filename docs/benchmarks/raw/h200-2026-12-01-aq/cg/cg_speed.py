"""bench_speed.py with the grouped_mm path on cgpatch's CUTLASS GEMMs from 128 rows per expert (session 37).
CG_MODE (default "ping_64x256_c1,coop_128x256_c1", call 6) and CG_FOLD=1 (the shared expert folded in, call 8)
choose the variant; for example, call 8's forward profiled:

    CG_MODE=ping_64x256_c1,ping_64x256_c1 CG_FOLD=1 python .carry/s38/cg/cg_speed.py --models llama3-8b \\
        --configs S1A1E8 --layers 4 --prefill 1x2048 --decode-batches --rounds 1 --profile
"""
import os
import sys

sys.path.insert(0, ".carry/s38/cg")
sys.path.insert(0, "benchmarks")
import cgpatch  # noqa: E402
import cmoe.triton_experts as te  # noqa: E402
from cmoe.bench import main  # noqa: E402

te.GROUPED_MM_MIN_ROWS = 128
cgpatch.MODE = os.environ.get("CG_MODE", "ping_64x256_c1,coop_128x256_c1")
cgpatch.FOLD = os.environ.get("CG_FOLD") == "1"
sys.exit(main(sys.argv[1:]))
