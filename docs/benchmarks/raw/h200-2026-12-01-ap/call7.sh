# Session 37, call 7: the CUTLASS grouped_mm path with its pointers from one Triton launch per GEMM: correctness,
# then the llama3-8b 1x2048 prefill A/B
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 90 python .carry/s37/cg/cg_check.py > $OUT/call7-check.txt 2>&1; echo rc=$?; grep -v -i warn $OUT/call7-check.txt | cut -c1-120
P="cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128"
timeout 420 python .carry/s37/cg/cg_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 --recompile \
  --arm default --arm "ping-coop: $P; cgpatch.MODE = 'ping_64x256_c1,coop_128x256_c1'" \
  --arm "ping-ping: $P; cgpatch.MODE = 'ping_64x256_c1,ping_64x256_c1'" \
  > $OUT/call7-ab.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call7-ab.txt | grep -v "^ *warnings\|_warn_once" | tail -8
date -u +%T
