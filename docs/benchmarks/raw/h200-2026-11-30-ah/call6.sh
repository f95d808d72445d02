set -x
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD/.carry/s29
pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
timeout 45 python -m pytest -q -rf tests/test_triton_experts.py -k "sort_pairs or grouped_mm" > $OUT/pytest.txt 2>&1; tail -1 $OUT/pytest.txt
for M in llama3-8b llama2-7b; do
timeout 100 python benchmarks/bench_ab.py --models $M --configs S2A2E8 --prefill 1x2048 --rounds 4 --repeats 7 --recompile --arm new --arm "old: abfns.OLD = True" > $OUT/ab-sort-$M.txt 2>&1; grep -A5 "median" $OUT/ab-sort-$M.txt || tail -3 $OUT/ab-sort-$M.txt
done
