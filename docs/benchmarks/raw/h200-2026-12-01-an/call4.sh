# Session 35, call 4 (main's code: the Gluon path off): profiles and --rest of the five missing cells
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 280 python benchmarks/bench_speed.py --models llama2-7b --configs S3A3E8 S2A2E8 --layers 4 --prefill \
  --decode-batches 128 256 --rounds 3 --profile --rest --out $OUT/dec > $OUT/dec.txt 2>&1; echo rc=$?
date -u +%T
timeout 280 python benchmarks/bench_speed.py --models llama3-8b --configs S1A1E8 S2A2E16 --layers 4 --prefill 1x2048 \
  --decode-batches --rounds 3 --profile --rest --out $OUT/pre > $OUT/pre.txt 2>&1; echo rc=$?
date -u +%T
grep -v -i warn $OUT/dec.txt | grep "^|" | head -20
grep -v -i warn $OUT/pre.txt | grep "^|" | head -20
