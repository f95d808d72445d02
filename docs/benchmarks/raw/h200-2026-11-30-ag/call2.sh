set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
TE=cmoe.triton_experts
timeout 560 python benchmarks/bench_ab.py --models llama2-7b --configs S1A1E8 S2A2E16 S2A2E8 --prefill 1x2048 --rounds 3 --repeats 7 --recompile --arm default --arm "fold: $TE.SHARED_FOLD_MAX_TOKENS = 4096" > $OUT/ab-prefill-llama2-7b.txt 2>&1; grep -A7 "median" $OUT/ab-prefill-llama2-7b.txt || tail -5 $OUT/ab-prefill-llama2-7b.txt
