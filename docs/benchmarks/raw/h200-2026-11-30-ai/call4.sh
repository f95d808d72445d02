set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 420 python benchmarks/bench_speed.py --models llama2-7b --layers 4 --decode-batches --out $OUT/prefill-l2 > $OUT/prefill-l2.txt 2>&1; grep -v "fused router" $OUT/prefill-l2.txt | tail -32
date -u +%T
kill %1
