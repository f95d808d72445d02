# Session 38, call 6: call 1's fold layer, piece by piece against torch
export PYTHONPATH=$PWD/src:$PWD/benchmarks
timeout 120 python .carry/s38/cg/cg_fold_check.py > $OUT/call6-foldcheck.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call6-foldcheck.txt | tail -30
