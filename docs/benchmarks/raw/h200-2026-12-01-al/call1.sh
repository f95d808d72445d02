# Call 1: dense-router-first GPU test; routed grouped kernels against plain Triton/cuBLAS at 1x2048; A/B of DENSE_ROUTER_FIRST on llama2-7b
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 100 python -m pytest -q -x tests/test_triton_experts.py -k "beside_in_a_cuda_graph or dense-router-first" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -3 $OUT/pytest.txt
date -u +%T
timeout 150 python .carry/s33/tile_bench.py llama3-8b llama2-7b > $OUT/tile-bench.txt 2>&1; echo rc=$?
cat $OUT/tile-bench.txt | grep -v -i warn
date -u +%T
timeout 320 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 128 256 --rounds 3 \
  --arm default --arm 'first: cmoe.triton_experts.DENSE_ROUTER_FIRST = True' > $OUT/ab-first-l2.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-first-l2.txt | grep -v -i warn | tail -30
date -u +%T
kill %1
