set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
M=${1:-llama2-7b}; TAG=${2:-l2}
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 570 python benchmarks/bench_speed.py --models $M --layers 4 --out $OUT/speed-$TAG > $OUT/speed-$TAG.txt 2>&1; tail -48 $OUT/speed-$TAG.txt
date -u +%T
kill %1
