# Session 34, call 1 (branch gmm-small-kernel): GPU tests of the spread groups; torch._grouped_mm's small kernel alone;
# A/B in the llama3-8b 1x2048 forward
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
date -u +%T
timeout 80 python -m pytest -q -x tests/test_triton_experts.py -k "grouped_mm or spread" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -2 $OUT/pytest.txt
timeout 90 python .carry/s34/gmm_small.py > $OUT/gmm-small.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/gmm-small.txt
date -u +%T
timeout 300 python benchmarks/bench_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 \
  --arm default --arm 'gmm: cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 256' \
  --arm 'small: cmoe.triton_experts.GMM_GROUP_ROWS = 128; cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 256' > $OUT/ab-small-l3.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-small-l3.txt | grep -v -i warn | grep -A5 "^| arm"
date -u +%T
