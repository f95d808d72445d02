# Call 2: GPU tests of cmoe.pdl (PDL on by default), then the decode cells of llama3-8b
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
true
tail -4 $OUT/pytest.txt
date -u +%T
timeout 450 python benchmarks/bench_speed.py --layers 4 --models llama3-8b --prefill --out $OUT/dec-l3 > $OUT/dec-l3.txt 2>&1; echo rc=$?
tail -42 $OUT/dec-l3.txt
date -u +%T
kill %1
