# Session 36, call 1: the packed dense path with the router inside the activation kernel (prototype): GPU correctness,
# then one layer against dense's FFN and the current dense path op
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
git log --oneline -1 > $OUT/head.txt 2>/dev/null
date -u +%T
timeout 120 python .carry/s36/test_glu_route.py > $OUT/test.txt 2>&1; echo rc=$?; tail -2 $OUT/test.txt
timeout 420 python .carry/s36/proto_bench.py > $OUT/proto.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/proto.txt | grep -v "^glu_route" | head -150
grep "^glu_route" $OUT/proto.txt | sort -t: -k2 -n | head -12
date -u +%T
