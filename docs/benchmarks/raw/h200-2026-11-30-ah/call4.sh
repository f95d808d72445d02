set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
date -u +%T
python benchmarks/bench_speed.py --models llama3-8b --layers 4 --out $OUT/speed-l3 > $OUT/speed-l3.txt 2>&1; tail -45 $OUT/speed-l3.txt | grep "prefill\|b=1 \|b=256\|b=128" | head -40
date -u +%T
timeout 130 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 256 --rounds 3 --arm a --arm b > $OUT/ab-b256-llama2-7b.txt 2>&1; grep -A8 "median" $OUT/ab-b256-llama2-7b.txt || tail -5 $OUT/ab-b256-llama2-7b.txt
date -u +%T
cd $OUT && tar czf speed-l3.tgz speed-l3 && rm -r speed-l3
