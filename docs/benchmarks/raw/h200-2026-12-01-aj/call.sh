# usage: bash call.sh TAG bench_speed-args...   (runs in the repo root on the H200)
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
TAG=$1; shift
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 560 python benchmarks/bench_speed.py --layers 4 "$@" --out $OUT/$TAG > $OUT/$TAG.txt 2>&1; echo rc=$?
tail -45 $OUT/$TAG.txt
date -u +%T
kill %1
