# Session 38, call 3: profiles of the llama3-8b S1A1E8 1x2048 forward, default (Triton grouped kernels) and the CUTLASS
# grouped_mm path with run ap call 7's best configuration (pointers from one Triton launch per GEMM)
export PYTHONPATH=$PWD/src:$PWD/benchmarks
date -u +%T
A="--models llama3-8b --configs S1A1E8 --layers 4 --prefill 1x2048 --decode-batches --rounds 1 --profile"
timeout 260 python benchmarks/bench_speed.py $A --out $OUT/call3-default > $OUT/call3-default.txt 2>&1; echo rc=$?
grep -v -i "warn" $OUT/call3-default.txt | grep -A30 "profile S1A1E8" | cut -c1-150 | head -32
CG_MODE=ping_64x256_c1,ping_64x256_c1 timeout 300 python .carry/s38/cg/cg_speed.py $A --out $OUT/call3-cutlass > $OUT/call3-cutlass.txt 2>&1; echo rc=$?
grep -v -i "warn" $OUT/call3-cutlass.txt | grep -A40 "profile S1A1E8" | cut -c1-150 | head -42
date -u +%T
