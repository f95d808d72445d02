set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout 90 python -m pytest -q -x tests/test_triton_experts.py -k "router or gemv_layer or unrolled or packed" > $OUT/pytest.txt 2>&1; tail -2 $OUT/pytest.txt
TE=cmoe.triton_experts
timeout 240 python benchmarks/bench_ab.py --models llama3-8b --configs S3A3E8 S2A2E8 --batch 256 --rounds 4 --recompile --arm "packed: cmoe.packed_ffn.PACK = True" --arm "packed-rolled: cmoe.packed_ffn.PACK = True; $TE.ROUTE_REDUCE_UNROLL = False" --arm unpacked > $OUT/ab-b256-llama3-8b.txt 2>&1; grep -A7 "median" $OUT/ab-b256-llama3-8b.txt || tail -5 $OUT/ab-b256-llama3-8b.txt
timeout 150 python benchmarks/bench_ab.py --models llama3-8b --configs S3A3E8 S2A2E8 --batch 128 --rounds 3 --recompile --arm "packed: cmoe.packed_ffn.PACK = True" --arm unpacked > $OUT/ab-b128-llama3-8b.txt 2>&1; grep -A6 "median" $OUT/ab-b128-llama3-8b.txt || tail -5 $OUT/ab-b128-llama3-8b.txt
