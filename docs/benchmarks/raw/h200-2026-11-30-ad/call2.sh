pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 220 python -m pytest -q tests/test_decode_layer.py tests/test_gemv.py tests/test_generation.py tests/test_decode_attention.py tests/test_attention.py tests/test_triton_experts.py -k "decode_layer or gemv or rms or whole_layer or generation or attention" > $OUT/pytest-call2.txt 2>&1; tail -3 $OUT/pytest-call2.txt; grep -E "FAILED|Error" $OUT/pytest-call2.txt | head
for M in llama2-7b llama3-8b; do
timeout 190 python benchmarks/bench_ab.py --models $M --configs S2A2E16 S1A1E8 --rounds 2 --recompile --arm fused --arm "plain: cmoe.generation.DECODE_LAYER = False" > $OUT/ab-layer-$M.txt 2>&1; grep -A6 "median" $OUT/ab-layer-$M.txt || tail -5 $OUT/ab-layer-$M.txt
done
