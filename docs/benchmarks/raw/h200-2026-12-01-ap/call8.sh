# Session 37, call 8: the shared expert folded into the CUTLASS grouped launches (cgpatch.FOLD): check, then the
# llama3-8b 1x2048 prefill A/B
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 60 python .carry/s37/cg/cg_check_fold.py > $OUT/call8-check.txt 2>&1; echo rc=$?; grep -v -i warn $OUT/call8-check.txt | cut -c1-150
P="cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128; cgpatch.MODE = 'ping_64x256_c1,ping_64x256_c1'"
timeout 230 python .carry/s37/cg/cg_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 2 --recompile \
  --arm default --arm "fold: $P; cgpatch.FOLD = True" > $OUT/call8-ab.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call8-ab.txt | grep -v "^ *warnings\|_warn_once" | tail -12
date -u +%T
