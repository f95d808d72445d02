export PYTHONPATH=$PWD/src:$PWD/benchmarks
for P in 1 0; do
timeout 270 python .carry/s26/prof.py $P --models llama3-8b --configs S3A3E8 --layers 4 --prefill --decode-batches 256 --profile --out $OUT/prof-pack$P > $OUT/prof-pack$P.txt 2>&1; tail -3 $OUT/prof-pack$P.txt
done
