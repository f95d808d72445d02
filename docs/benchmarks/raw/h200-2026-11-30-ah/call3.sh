set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
date -u +%T
python benchmarks/bench_speed.py --models llama2-7b --layers 4 --out $OUT/speed-l2 > $OUT/speed-l2.txt 2>&1; tail -45 $OUT/speed-l2.txt | grep "prefill\|b=1 \|b=256\|b=128\|rel err" | head -40
date -u +%T
for S in 3 2; do
timeout 100 python .carry/s29/prof_slots.py $S --models llama2-7b --configs S3A3E8 --layers 4 --prefill 1x2048 --decode-batches 1 --profile --out $OUT/prof-slots$S > $OUT/prof-slots$S.txt 2>&1; grep -A22 "profile prefill" $OUT/prof-slots$S/log.txt | tail -22
done
date -u +%T
