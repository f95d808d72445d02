set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown --format=csv -lms 100 > $OUT/smi.csv 2>&1 &
SMI=$!
TE=cmoe.triton_experts
for M in llama2-7b llama3-8b; do
date -u +%T
timeout 150 python benchmarks/bench_ab.py --models $M --configs S2A2E8 S3A3E8 --prefill 1x2048 --rounds 3 --repeats 7 --recompile --arm default --arm "rows: $TE.GMM_ROWS = True" > $OUT/ab-rows-1x2048-$M.txt 2>&1; grep -A8 "median" $OUT/ab-rows-1x2048-$M.txt || tail -5 $OUT/ab-rows-1x2048-$M.txt
done
date -u +%T
timeout 170 python benchmarks/bench_ab.py --models llama3-8b --configs S2A2E16 --prefill 8x2048 --rounds 6 --repeats 7 --recompile --arm default --arm "rows: $TE.GMM_ROWS = True" > $OUT/ab-rows-8x2048-S2A2E16-llama3-8b.txt 2>&1; grep -A8 "median" $OUT/ab-rows-8x2048-S2A2E16-llama3-8b.txt || tail -5 $OUT/ab-rows-8x2048-S2A2E16-llama3-8b.txt
date -u +%T
kill $SMI
