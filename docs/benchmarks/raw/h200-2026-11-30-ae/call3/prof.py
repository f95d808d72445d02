"""bench_speed with cmoe.packed_ffn.PACK set from argv[1] (1/0); the rest of argv goes to bench_speed."""
import runpy
import sys

import cmoe.packed_ffn

cmoe.packed_ffn.PACK = sys.argv[1] == "1"
sys.argv = ["benchmarks/bench_speed.py"] + sys.argv[2:]
runpy.run_path("benchmarks/bench_speed.py", run_name="__main__")
