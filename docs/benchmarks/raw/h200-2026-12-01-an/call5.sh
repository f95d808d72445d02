export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 300 python .carry/s35/dense_pieces.py > $OUT/dense-pieces.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/dense-pieces.txt
date -u +%T
