set -x
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout 120 python -m pytest -q tests/test_triton_experts.py -k "packing or whole_layer or dense" > $OUT/pytest-call1.txt 2>&1; tail -2 $OUT/pytest-call1.txt; grep -E "^E |FAILED" $OUT/pytest-call1.txt | head -10
for M in llama3-8b llama2-7b; do
timeout 230 python benchmarks/bench_ab.py --models $M --configs S3A3E8 S2A2E8 --batch 256 --rounds 3 --arm packed --arm "unpacked: cmoe.packed_ffn.PACK = False" > $OUT/ab-pack-b256-$M.txt 2>&1; grep -A6 "median" $OUT/ab-pack-b256-$M.txt || tail -5 $OUT/ab-pack-b256-$M.txt
done
