set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 250 python benchmarks/bench_speed.py --layers 4 --models llama2-7b llama3-8b --configs S2A2E8 --prefill --decode-batches 128 256 --out $OUT/s2a2e8 > $OUT/s2a2e8.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/s2a2e8.txt | grep -v "warn" | tail -30
date -u +%T
timeout 250 python benchmarks/bench_speed.py --layers 4 --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --decode-batches --rest --out $OUT/rest-l3 > $OUT/rest-l3.txt 2>&1; echo rc=$?
tail -22 $OUT/rest-l3.txt
date -u +%T
kill %1
