# Session 37, call 5: the CUTLASS grouped_mm path in the llama3-8b 1x2048 prefill: the shared expert's stream
# (serial), and CUTLASS's persistent grid on fewer SMs
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
P="cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128; cgpatch.MODE = 'ping_64x256_c1,coop_128x256_c1'"
timeout 560 python .carry/s37/cg/cg_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 --recompile \
  --arm default --arm "ping: $P" --arm "ping-serial: $P; cmoe.triton_experts.SHARED_STREAM = False" \
  --arm "ping-sms100: $P; cg_bench.SMS = 100" --arm "ping-sms66: $P; cg_bench.SMS = 66" \
  > $OUT/call5-ab.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call5-ab.txt | grep -v "^ *warnings\|_warn_once" | tail -12
date -u +%T
