pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 100 python -m pytest -q tests/test_decode_layer.py tests/test_gemv.py > $OUT/pytest-call4.txt 2>&1; tail -2 $OUT/pytest-call4.txt; grep -E "^E " $OUT/pytest-call4.txt | head -5
for M in llama2-7b llama3-8b; do
timeout 200 python benchmarks/bench_ab.py --models $M --configs S2A2E16 S1A1E8 --rounds 2 --recompile --arm fused --arm "plain: cmoe.generation.DECODE_LAYER = False" --arm "gu2: cmoe.triton_experts.GEMV_CONFIG['gate_up_norm'] = (2, 2048, 2)" > $OUT/ab-layer2-$M.txt 2>&1; grep -A7 "median" $OUT/ab-layer2-$M.txt || tail -5 $OUT/ab-layer2-$M.txt
done
