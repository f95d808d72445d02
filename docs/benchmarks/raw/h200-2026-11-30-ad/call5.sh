export PYTHONPATH=$PWD/src:$PWD/benchmarks
A="cmoe.triton_experts.GEMV_CONFIG['gate_up_norm']"
timeout 280 python benchmarks/bench_ab.py --models llama2-7b --configs S2A2E16 S1A1E8 --rounds 2 --recompile --arm "plain: cmoe.generation.DECODE_LAYER = False" --arm "n2x1024w4: $A = (2, 1024, 4)" --arm "n4x1024w4: $A = (4, 1024, 4)" --arm "n2x2048w4: $A = (2, 2048, 4)" --arm "n4x512w4: $A = (4, 512, 4)" --arm "n1x2048w2: $A = (1, 2048, 2)" > $OUT/ab-norm-tiles-llama2-7b.txt 2>&1; grep -A10 "median" $OUT/ab-norm-tiles-llama2-7b.txt || tail -5 $OUT/ab-norm-tiles-llama2-7b.txt
