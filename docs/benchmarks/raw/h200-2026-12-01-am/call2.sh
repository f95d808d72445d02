# Session 34, call 2 (branch gate-up-paired): GPU tests; the paired gate/up sweep
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
date -u +%T
timeout 120 python -m pytest -q -x tests/test_triton_experts.py -k "paired or grouped" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -2 $OUT/pytest.txt
timeout 400 python .carry/s34/paired_sweep.py > $OUT/paired-sweep.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/paired-sweep.txt
date -u +%T
