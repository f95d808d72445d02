set -x
export PYTHONPATH=$PWD/src:$PWD/benchmarks
timeout 330 python benchmarks/bench_ab.py --models llama3-8b --configs S3A3E8 S2A2E8 --batch 256 --rounds 4 --recompile --arm packed --arm "unpacked: cmoe.packed_ffn.PACK = False" > $OUT/ab-pack-b256-llama3-8b.txt 2>&1; grep -A6 "median" $OUT/ab-pack-b256-llama3-8b.txt || tail -5 $OUT/ab-pack-b256-llama3-8b.txt
grep "round" $OUT/ab-pack-b256-llama3-8b.txt
timeout 220 python benchmarks/bench_ab.py --models llama2-7b --configs S3A3E8 --batch 256 --rounds 2 --recompile --arm packed --arm "unpacked: cmoe.packed_ffn.PACK = False" > $OUT/ab-pack-b256-llama2-7b.txt 2>&1; grep -A6 "median" $OUT/ab-pack-b256-llama2-7b.txt || tail -5 $OUT/ab-pack-b256-llama2-7b.txt
grep "round" $OUT/ab-pack-b256-llama2-7b.txt
