# Call 5: the routing loads of the benchmark's llama3-8b models at 1x2048; A/B of the capacity factor in the forward
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 100 python .carry/s33/loads.py > $OUT/loads.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/loads.txt
date -u +%T
timeout 230 python benchmarks/bench_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 \
  --arm 'grouped: cmoe.triton_experts.CAPACITY_MIN_ROWS = 1000000000' \
  --arm 'cap1.5: cmoe.triton_experts.CAPACITY_FACTOR = 1.5' \
  --arm 'cap2: cmoe.triton_experts.CAPACITY_FACTOR = 2.0' > $OUT/ab-factor-l3.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-factor-l3.txt | grep -v -i warn | tail -8
date -u +%T
kill %1
