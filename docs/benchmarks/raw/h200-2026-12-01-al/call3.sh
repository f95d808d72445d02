# Call 3: GPU tests of the capacity path; one layer, capacity vs grouped; A/B in the llama3-8b 1x2048 forward
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 150 python -m pytest -q -x tests/test_triton_experts.py -k "capacity or pair_rows or align_covers or grouped_mm or beside" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -3 $OUT/pytest.txt
date -u +%T
timeout 120 python .carry/s33/layer_bench.py > $OUT/layer-bench.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/layer-bench.txt
date -u +%T
timeout 280 python benchmarks/bench_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 \
  --arm default --arm 'grouped: cmoe.triton_experts.CAPACITY_MIN_ROWS = 1000000000' > $OUT/ab-cap-l3.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-cap-l3.txt | grep -v -i warn | tail -14
date -u +%T
kill %1
