"""bench_speed.py with cmoe.triton_experts.GMM_ROWS_MAX_SLOTS set first: python prof_slots.py SLOTS ARGS..."""
import runpy, sys
import cmoe.triton_experts as te
te.GMM_ROWS_MAX_SLOTS = int(sys.argv[1])
sys.argv = ["benchmarks/bench_speed.py", *sys.argv[2:]]
runpy.run_path("benchmarks/bench_speed.py", run_name="__main__")
