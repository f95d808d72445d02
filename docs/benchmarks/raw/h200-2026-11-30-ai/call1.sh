set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
date -u +%T
timeout 200 python benchmarks/bench_speed.py --models llama2-7b --layers 4 --configs S3A3E8 S1A1E8 --prefill 1x2048 --decode-batches 1 256 --rounds 3 --out $OUT/val > $OUT/val.txt 2>&1; tail -30 $OUT/val.txt
date -u +%T
timeout 220 python benchmarks/bench_ab.py --models llama2-7b --configs S1A1E8 S2A2E16 S2A2E8 --prefill 1x2048 --rounds 3 --repeats 7 --arm default --arm "hi: cmoe.triton_experts.SIDE_STREAM_PRIORITY = -1" > $OUT/ab-prio-1x2048.txt 2>&1; tail -8 $OUT/ab-prio-1x2048.txt
date -u +%T
timeout 150 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 256 --rounds 3 --arm default --arm "hi: cmoe.triton_experts.SIDE_STREAM_PRIORITY = -1" > $OUT/ab-prio-b256.txt 2>&1; tail -8 $OUT/ab-prio-b256.txt
date -u +%T
