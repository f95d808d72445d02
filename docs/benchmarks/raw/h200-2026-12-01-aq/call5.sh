# Session 38, call 5: llama3-8b S1A1E8 1x2048 prefill A/B: default and CUTLASS paths, each with the shared expert on the
# second stream (as now) and on the current stream (SHARED_STREAM = False): how much each path gains from the overlap
export PYTHONPATH=$PWD/src:$PWD/benchmarks
date -u +%T
P="cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128; cgpatch.MODE = 'ping_64x256_c1,ping_64x256_c1'"
S="cmoe.triton_experts.SHARED_STREAM = False"
timeout 560 python .carry/s38/cg/burst_ab.py --models llama3-8b --configs S1A1E8 --prefill 1x2048 --rounds 3 --recompile \
  --arm default --arm "default-serial: $S" --arm "cutlass: $P" --arm "cutlass-serial: $P; $S" > $OUT/call5-ab.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call5-ab.txt | grep -v "^ *warnings\|_warn_once" | tail -22
date -u +%T
