# Session 37, call 1: the two-launch dense path prototype: GPU tests, then the tile sweeps on llama2-7b S3A3E8
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>&1 | tail -1
date -u +%T
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv,noheader
timeout 150 python -m pytest -q -x .carry/s37/test_fd.py > $OUT/call1-test.txt 2>&1; echo rc=$?; tail -2 $OUT/call1-test.txt
timeout 520 python .carry/s37/fd_bench.py sweep > $OUT/call1-sweep.txt 2>&1; echo rc=$?
grep -E "^##|BEST|\[" $OUT/call1-sweep.txt
for T in 128 256; do :; done
grep "^fd" $OUT/call1-sweep.txt | grep -v failed | sort -t'(' -k1 | awk -F'without the sum' '{print $2" | "$1}' | sort -n | head -20
date -u +%T
