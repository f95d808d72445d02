pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 70 python -m pytest -q -x tests/test_triton_experts.py -k "packing or pack_model or dense-packed or cuda_graph" > $OUT/pytest-call5.txt 2>&1; tail -1 $OUT/pytest-call5.txt; grep -E "^E |FAILED" $OUT/pytest-call5.txt | head -5
export PYTHONPATH=$PWD/src:$PWD/benchmarks
timeout 420 python benchmarks/bench_speed.py --models llama3-8b --layers 4 --out $OUT/speed-l3 > $OUT/speed-l3.txt 2>&1; tail -3 $OUT/speed-l3.txt; grep -E "FAILED|rel err" $OUT/speed-l3.txt | head -8
