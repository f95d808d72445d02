# Session 38, call 1: decode-size layers (128/256 tokens) on CUTLASS grouped GEMMs, shared expert as group 0
export PYTHONPATH=$PWD/src:$PWD/benchmarks
date -u +%T; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 420 python .carry/s38/cg/cg_layer.py > $OUT/call1-layer.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call1-layer.txt | grep -v "^  gate/up\|^  down" | cut -c1-260
date -u +%T
