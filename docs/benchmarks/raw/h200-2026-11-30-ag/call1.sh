set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
TE=cmoe.triton_experts
GMM="gmm: $TE.DENSE_MIN_TOKENS = 1000000; $TE.SHARED_FOLD_MAX_TOKENS = 128; $TE.GROUPED_MM_MIN_ROWS = 0"
timeout 270 python benchmarks/bench_ab.py --models llama3-8b --configs S3A3E8 S2A2E8 --batch 256 --rounds 4 --recompile --arm dense --arm "$GMM" > $OUT/ab-b256-llama3-8b.txt 2>&1; grep -A7 "median" $OUT/ab-b256-llama3-8b.txt || tail -5 $OUT/ab-b256-llama3-8b.txt
timeout 270 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 256 --rounds 4 --recompile --arm dense --arm "$GMM" > $OUT/ab-b256-llama2-7b.txt 2>&1; grep -A7 "median" $OUT/ab-b256-llama2-7b.txt || tail -5 $OUT/ab-b256-llama2-7b.txt
