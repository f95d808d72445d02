set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 280 python benchmarks/bench_speed.py --models llama3-8b --layers 4 --decode-batches --out $OUT/prefill-l3 > $OUT/prefill-l3.txt 2>&1; grep -v "fused router" $OUT/prefill-l3.txt | tail -32
date -u +%T
kill %1
