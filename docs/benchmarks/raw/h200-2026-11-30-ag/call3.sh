set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout 100 python -m pytest -q -x tests/test_triton_experts.py -k "beyond_the_fold or beside or fake_matches or fused_router or gemm_serves" > $OUT/pytest.txt 2>&1; tail -2 $OUT/pytest.txt
timeout 60 python .carry/s28/route_sweep.py > $OUT/route-sweep.txt 2>&1; cat $OUT/route-sweep.txt | grep -v Warn
TE=cmoe.triton_experts
for M in llama2-7b llama3-8b; do
timeout 200 python benchmarks/bench_ab.py --models $M --configs S1A1E8 S2A2E16 S2A2E8 --prefill 1x2048 --rounds 3 --repeats 7 --recompile --arm new --arm "summed: $TE.PREFILL_SLOTS = False" --arm "narrow: $TE.ROUTE_WIDE_MIN_TOKENS = 1000000" --arm "old: $TE.PREFILL_SLOTS = False; $TE.ROUTE_WIDE_MIN_TOKENS = 1000000" > $OUT/ab-prefill-$M.txt 2>&1; grep -A8 "median" $OUT/ab-prefill-$M.txt || tail -5 $OUT/ab-prefill-$M.txt
done
