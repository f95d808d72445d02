# Session 36, call 2: the router's scores from one cuBLAS GEMM with float32 out, the routing finished in the activation kernel
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 150 python .carry/s36/test_glu_route.py > $OUT/test.txt 2>&1; echo rc=$?; grep -E "scores|ALL|FAIL" $OUT/test.txt
timeout 400 python .carry/s36/proto2.py > $OUT/proto2.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/proto2.txt
date -u +%T
