# Call 1: GPU tests of cmoe.pdl, then the A/B at batch 1 on llama2-7b: no PDL / our kernels with PDL / ours and inductor's
set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
git log --oneline -1 > $OUT/head.txt 2>/dev/null; git status --short >> $OUT/head.txt 2>/dev/null
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap --format=csv -lms 250 > $OUT/smi.csv &
date -u +%T
timeout 150 python -m pytest -q -x tests/test_pdl.py tests/test_gemv.py tests/test_decode_attention.py \
  tests/test_triton_experts.py -k "pdl or gemv or decode_attention or Gemv or cuda_graph" > $OUT/pytest.txt 2>&1; echo rc=$?
tail -5 $OUT/pytest.txt
date -u +%T
timeout 400 python benchmarks/bench_ab.py --models llama2-7b --configs S1A1E8 S2A2E16 --batch 1 --rounds 2 \
  --arm default --arm "ours: cmoe.pdl.ENABLED = True" \
  --arm "both: cmoe.pdl.ENABLED = True; torch._inductor.config.triton.enable_pdl = True" > $OUT/ab-pdl-l2.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-pdl-l2.txt | grep -v -i warn | tail -25
date -u +%T
kill %1
