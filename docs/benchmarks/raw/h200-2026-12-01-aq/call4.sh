# Session 38, call 4: the kernel timeline of one llama3-8b S1A1E8 1x2048 forward, default and CUTLASS (call 3's two paths)
export PYTHONPATH=$PWD/src:$PWD/benchmarks
date -u +%T
A="--models llama3-8b --configs S1A1E8 --layers 4 --prefill 1x2048 --decode-batches --rounds 1 --profile"
timeout 250 python .carry/s38/cg/cg_trace.py $A --out $OUT/call4-default > $OUT/call4-default.txt 2>&1; echo rc=$?
grep -v -i "warn" $OUT/call4-default.txt | grep -A45 "timeline S1A1E8" | cut -c1-170
CG_MODE=ping_64x256_c1,ping_64x256_c1 timeout 280 python .carry/s38/cg/cg_trace.py $A --out $OUT/call4-cutlass > $OUT/call4-cutlass.txt 2>&1; echo rc=$?
grep -v -i "warn" $OUT/call4-cutlass.txt | grep -A45 "timeline S1A1E8" | cut -c1-170
date -u +%T
