set -x
export PYTHONPATH=$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
TE=cmoe.triton_experts
timeout 190 python benchmarks/bench_ab.py --models llama2-7b --configs S2A2E16 S1A1E8 --batch 1 --rounds 3 --arm unrolled --arm "rolled: $TE.ROUTE_REDUCE_UNROLL = False" > $OUT/ab-b1-llama2-7b.txt 2>&1; grep -A6 "median" $OUT/ab-b1-llama2-7b.txt || tail -5 $OUT/ab-b1-llama2-7b.txt
timeout 380 python benchmarks/bench_speed.py --models llama2-7b --layers 4 --out $OUT/speed-l2 > $OUT/speed-l2.txt 2>&1; tail -45 $OUT/speed-l2.txt
