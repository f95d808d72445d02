set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout 60 python -m pytest -q -x tests/test_triton_experts.py -k "fused_router or beyond_the_fold or beside" > $OUT/pytest.txt 2>&1; tail -2 $OUT/pytest.txt
TE=cmoe.triton_experts
timeout 120 python benchmarks/bench_ab.py --models llama2-7b --configs S1A1E8 S2A2E16 S2A2E8 --prefill 1x2048 --rounds 3 --repeats 7 --recompile --arm wide --arm "narrow: $TE.ROUTE_WIDE_MIN_TOKENS = 1000000" > $OUT/ab-prefill-router-llama2-7b.txt 2>&1; grep -A6 "median" $OUT/ab-prefill-router-llama2-7b.txt || tail -5 $OUT/ab-prefill-router-llama2-7b.txt
python benchmarks/bench_speed.py --models llama2-7b --layers 4 --out $OUT/speed-l2 > $OUT/speed-l2.txt 2>&1; tail -45 $OUT/speed-l2.txt | grep "prefill\|b=1 \|b=256\|b=128" | head -40
