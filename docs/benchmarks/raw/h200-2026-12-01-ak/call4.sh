# Call 4: the prefill cells of both shapes (no decode path of the change runs in them)
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 480 python benchmarks/bench_speed.py --layers 4 --models llama2-7b llama3-8b --decode-batches --out $OUT/pre > $OUT/pre.txt 2>&1; echo rc=$?
tail -32 $OUT/pre.txt
date -u +%T
kill %1
