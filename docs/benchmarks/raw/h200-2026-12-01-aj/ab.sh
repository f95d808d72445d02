# A/B on the H200: the dense path (default) against the grouped kernels at b=128 and 256, S3A3E8 and S2A2E8
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
for M in llama2-7b llama3-8b; do
  timeout 280 python benchmarks/bench_ab.py --models $M --configs S3A3E8 S2A2E8 --batch 128 256 --rounds 3 --repeats 1 \
    --arm default --arm "grouped: cmoe.triton_experts.DENSE_MIN_TOKENS = 1000000" > $OUT/ab-dense-$M.txt 2>&1; echo rc=$?
  grep -v "^#" $OUT/ab-dense-$M.txt | tail -40
  date -u +%T
done
kill %1
