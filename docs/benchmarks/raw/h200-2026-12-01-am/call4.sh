# Session 34, call 4: the prefill cells of both shapes with the paired gate/up kernel in the prefill tiles
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 480 python benchmarks/bench_speed.py --layers 4 --models llama2-7b llama3-8b --decode-batches --out $OUT/pre > $OUT/pre.txt 2>&1; echo rc=$?
tail -32 $OUT/pre.txt
date -u +%T
kill %1
