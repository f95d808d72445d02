set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $OUT/gpu.txt
timeout 90 python -m pytest -q -x -rf tests/test_triton_experts.py -k "beyond_the_fold or beside or grouped_mm_rows or fused_router" > $OUT/pytest.txt 2>&1; tail -2 $OUT/pytest.txt
TE=cmoe.triton_experts
for M in llama2-7b llama3-8b; do
timeout 220 python benchmarks/bench_ab.py --models $M --configs S2A2E8 S2A2E16 --prefill 8x2048 --rounds 3 --repeats 7 --recompile --arm default --arm "rows: $TE.GMM_ROWS = True" > $OUT/ab-rows-8x2048-$M.txt 2>&1; grep -A8 "median" $OUT/ab-rows-8x2048-$M.txt || tail -5 $OUT/ab-rows-8x2048-$M.txt
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv >> $OUT/gpu.txt
