export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 400 python .carry/s35/sweep2.py > $OUT/sweep2.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/sweep2.txt
date -u +%T
