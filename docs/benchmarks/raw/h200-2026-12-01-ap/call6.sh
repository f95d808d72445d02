# Session 37, call 6: a profile of the llama3-8b S1A1E8 1x2048 forward on the CUTLASS grouped_mm path
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
timeout 400 python .carry/s37/cg/cg_speed.py --models llama3-8b --configs S1A1E8 --layers 4 --prefill 1x2048 --decode-batches --rounds 1 --profile --out $OUT/call6-speed > $OUT/call6-profile.txt 2>&1; echo rc=$?
grep -v -i "warn" $OUT/call6-profile.txt | grep -A40 "profile S1A1E8" | cut -c1-150 | head -45
date -u +%T
