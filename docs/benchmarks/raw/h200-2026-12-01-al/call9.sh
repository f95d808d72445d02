# Call 9: GPU tests of the activation kernel's row blocks; the kernel alone at the model's shapes; A/B in the decode step at b=128/256
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
date -u +%T
timeout 80 python -m pytest -q -x tests/test_triton_experts.py -k "glu or dense_layer or grouped_mm_path" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -2 $OUT/pytest.txt
date -u +%T
timeout 60 python .carry/s33/glu_bench.py > $OUT/glu-bench.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/glu-bench.txt
date -u +%T
timeout 170 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 128 256 --rounds 3 \
  --arm default --arm 'old: cmoe.triton_experts.GLU_TILE = (1, 1024)' > $OUT/ab-glu-l2.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-glu-l2.txt | grep -v -i warn | grep -A4 "^| arm"
date -u +%T
