# Session 35, call 1 (branch gluon-grouped): GPU tests of the Gluon grouped kernels; one layer Triton vs Gluon and
# the Gluon tiles; A/B in the llama3-8b 1x2048 forward
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
date -u +%T
timeout 120 python -m pytest -q -x tests/test_triton_experts.py -k "gluon or paired" > $OUT/pytest.txt 2>&1; rc=$?; echo rc=$rc
tail -3 $OUT/pytest.txt
[ $rc = 0 ] || { echo "GPU tests failed or hung: no sweep, no A/B"; exit 1; }
timeout 150 python .carry/s35/gluon_sweep.py > $OUT/gluon-sweep.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/gluon-sweep.txt
date -u +%T
timeout 300 python benchmarks/bench_ab.py --models llama3-8b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 \
  --arm default --arm 'gluon: cmoe.triton_experts.GLUON_GROUPED = True' \
  --arm 'gluon-gather: cmoe.triton_experts.GLUON_GROUPED = True; cmoe.triton_experts.GLUON_GATHER = True' > $OUT/ab-gluon-l3.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-gluon-l3.txt | grep -v -i warn | grep -A5 "^| arm"
date -u +%T
