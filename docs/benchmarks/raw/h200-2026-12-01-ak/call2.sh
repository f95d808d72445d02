# Call 2: GPU tests of cmoe.pdl (PDL on by default), then the decode cells of llama2-7b
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 120 python -m pytest -q tests/test_pdl.py tests/test_gemv.py tests/test_decode_attention.py tests/test_generation.py \
  tests/test_triton_experts.py -k "pdl or gemv or decode_attention or cuda_graph or gpu or captured" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -4 $OUT/pytest.txt
date -u +%T
timeout 450 python benchmarks/bench_speed.py --layers 4 --models llama2-7b --prefill --out $OUT/dec-l2 > $OUT/dec-l2.txt 2>&1; echo rc=$?
tail -42 $OUT/dec-l2.txt
date -u +%T
kill %1
