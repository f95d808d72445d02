"""bench_ab.py with cgpatch's CUTLASS grouped GEMMs installed (session 37)."""
import sys

sys.path.insert(0, ".carry/s37/cg")
sys.path.insert(0, "benchmarks")
import cgpatch  # noqa: E402,F401
import bench_ab  # noqa: E402

sys.exit(bench_ab.main(sys.argv[1:]))
