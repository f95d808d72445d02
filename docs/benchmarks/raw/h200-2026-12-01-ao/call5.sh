# Session 36, call 5: the packed two-stream dense path (prototype) at b=128: llama2-7b again with 5 rounds, llama3-8b
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD/.carry/s36
date -u +%T
timeout 280 python .carry/s36/ab_packed.py --models llama2-7b --configs S3A3E8 S2A2E8 --batch 128 --rounds 5 --recompile \
  --arm default --arm "packed: packed_ab.ON = True" > $OUT/ab-l2-b128.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/ab-l2-b128.txt | grep -v "^ *warnings\|_warn_once"
date -u +%T
timeout 280 python .carry/s36/ab_packed.py --models llama3-8b --configs S3A3E8 S2A2E8 --batch 128 --rounds 3 --recompile \
  --arm default --arm "packed: packed_ab.ON = True" > $OUT/ab-l3-b128.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/ab-l3-b128.txt | grep -v "^ *warnings\|_warn_once"
date -u +%T
