# Call 4: GPU tests again (the path as the rows op's argument); why the capacity path loses in the forward: A/B arms; a profile
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 100 python -m pytest -q -x tests/test_triton_experts.py -k "capacity or pair_rows or grouped_mm" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -3 $OUT/pytest.txt
date -u +%T
timeout 250 python benchmarks/bench_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 \
  --arm default --arm 'opsum: cmoe.triton_experts.ROWS_MAX_SLOTS = 0' \
  --arm 'inorder: cmoe.triton_experts.SHARED_STREAM = False' \
  --arm 'grouped: cmoe.triton_experts.CAPACITY_MIN_ROWS = 1000000000' > $OUT/ab-cap2-l3.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-cap2-l3.txt | grep -v -i warn | tail -9
date -u +%T
timeout 120 python benchmarks/bench_speed.py --layers 4 --models llama3-8b --configs S1A1E8 --prefill 1x2048 --decode-batches \
  --rounds 1 --profile --out $OUT/prof-l3 > $OUT/prof-l3.txt 2>&1; echo rc=$?
grep -A30 "profile S1A1E8" $OUT/prof-l3.txt | head -34
date -u +%T
kill %1
