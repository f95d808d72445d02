"""bench_ab.py with packed_ab's patches applied first (session 36, call 4)."""
import sys

sys.path.insert(0, ".carry/s36")
sys.path.insert(0, "benchmarks")
import packed_ab  # noqa: E402,F401  (patches cmoe.bench.convert_model_ and cmoe.triton_experts.dense_moe)
import bench_ab  # noqa: E402

sys.exit(bench_ab.main(sys.argv[1:]))
