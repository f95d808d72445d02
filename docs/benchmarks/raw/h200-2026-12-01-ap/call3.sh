# Session 37, call 3: CUTLASS 3 pointer-array grouped GEMMs (built on the CPU machine, nvcc 13.0, sm_90a) against
# torch._grouped_mm, the Triton grouped path and cuBLAS's plain GEMMs, the routed experts at 1x2048
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 400 python .carry/s37/cg/cg_bench.py > $OUT/call3-cutlass.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call3-cutlass.txt | tail -80
date -u +%T
