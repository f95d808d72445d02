# Session 36, call 4: the packed two-stream dense path (prototype, packed_ab.py) in the compiled decode step, llama2-7b
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD/.carry/s36
date -u +%T
timeout 560 python .carry/s36/ab_packed.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 128 256 --rounds 3 --recompile \
  --arm default --arm "packed: packed_ab.ON = True" > $OUT/ab-l2.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/ab-l2.txt | grep -v "^ *warnings\|_warn_once"
date -u +%T
