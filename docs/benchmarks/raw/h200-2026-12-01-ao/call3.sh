# Session 36, call 3: GEMMs on two streams at once; the packed layer with its gate/up halves side by side
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 400 python .carry/s36/proto3.py > $OUT/proto3.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/proto3.txt
date -u +%T
