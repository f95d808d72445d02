# Session 35, call 6 (branch route-one-launch): the split router in one launch
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
date -u +%T
timeout 150 python -m pytest -q -x tests/test_triton_experts.py -k "route or dense or beside or whole_layer" > $OUT/pytest.txt 2>&1; rc=$?; echo rc=$rc
tail -3 $OUT/pytest.txt
[ $rc = 0 ] || { echo "GPU tests failed or hung"; exit 1; }
timeout 90 python .carry/s35/route_bench.py > $OUT/route-bench.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/route-bench.txt
date -u +%T
timeout 330 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 128 256 --rounds 3 \
  --arm default --arm 'two: cmoe.triton_experts.ROUTE_ONE_LAUNCH = False' > $OUT/ab-route.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-route.txt | grep -v -i warn | grep -B2 -A8 "^| "
date -u +%T
