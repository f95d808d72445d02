set -x
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
python -m pytest -q tests/test_decode_attention.py tests/test_generation.py tests/test_attention.py > $OUT/pytest-call1.txt 2>&1; tail -3 $OUT/pytest-call1.txt
python .carry/s25/check_tiles.py > $OUT/check-tiles.txt 2>&1; tail -3 $OUT/check-tiles.txt
W16="w16: cmoe.triton_experts.GEMV_CONFIG['gate_up'] = (2, 4096, 16); cmoe.triton_experts.GEMV_CONFIG['down'] = (1, 1024, 16); cmoe.gemv.GEMV_TILE = (2, 4096, 16)"
W8="w8: cmoe.triton_experts.GEMV_CONFIG['gate_up'] = (2, 4096, 8); cmoe.triton_experts.GEMV_CONFIG['down'] = (2, 1024, 8); cmoe.gemv.GEMV_TILE = (2, 4096, 8)"
for M in llama2-7b llama3-8b; do
python benchmarks/bench_ab.py --models $M --configs S2A2E16 S1A1E8 --rounds 2 --arm default --arm "$W16" --arm "$W8" > $OUT/ab-w16-$M.txt 2>&1; grep -A6 "median" $OUT/ab-w16-$M.txt
done
