pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 100 python -m pytest -q -x tests/test_decode_layer.py > $OUT/pytest-call3.txt 2>&1; tail -3 $OUT/pytest-call3.txt; grep -E "^E " $OUT/pytest-call3.txt | head -20
timeout 150 python benchmarks/bench_gemv.py --shapes 12288x4096 4096x4096 6144x4096 --tiles 4/2048/4 8/1024/4 8/512/4 16/512/8 4/1024/2 1/4096/4 --rows 1 > $OUT/gemv-norm.txt 2>&1; cat $OUT/gemv-norm.txt | head -40
