# Session 37, call 4: the grouped_mm path on CUTLASS grouped GEMMs (cgpatch): correctness, then the llama3-8b 1x2048
# prefill A/B against the default path
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 90 python .carry/s37/cg/cg_check.py > $OUT/call4-check.txt 2>&1; echo rc=$?; grep -v -i warn $OUT/call4-check.txt
timeout 480 python .carry/s37/cg/cg_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 --recompile \
  --arm default \
  --arm "ping: cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128; cgpatch.MODE = 'ping_64x256_c1,coop_128x256_c1'" \
  --arm "coop: cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128; cgpatch.MODE = 'coop_128x256_c1,coop_128x256_c1'" \
  > $OUT/call4-ab.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call4-ab.txt | grep -v "^ *warnings\|_warn_once" | tail -40
date -u +%T
