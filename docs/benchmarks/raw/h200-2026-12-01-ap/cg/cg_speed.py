"""bench_speed.py with the grouped_mm path on cgpatch's CUTLASS GEMMs from 128 rows per expert (session 37)."""
import sys

sys.path.insert(0, ".carry/s37/cg")
sys.path.insert(0, "benchmarks")
import cgpatch  # noqa: E402
import cmoe.triton_experts as te  # noqa: E402
from cmoe.bench import main  # noqa: E402

te.GROUPED_MM_MIN_ROWS = 128
cgpatch.MODE = "ping_64x256_c1,coop_128x256_c1"
sys.exit(main(sys.argv[1:]))
