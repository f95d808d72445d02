# Session 38, call 2: llama3-8b S1A1E8 1x2048 prefill, Triton grouped kernels against the CUTLASS path (run ap call 7's
# best), timed as the sustained rate (as the table) and in bursts after idle; nvidia-smi samples SM clock and power
export PYTHONPATH=$PWD/src:$PWD/benchmarks
date -u +%T
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 > $OUT/call2-smi.csv 2>&1 &
SMI=$!
P="cmoe.triton_experts.GROUPED_MM_MIN_ROWS = 128; cgpatch.MODE = 'ping_64x256_c1,ping_64x256_c1'"
for mode in sustained burst; do
  echo "== $mode $(date -u +%T.%N)" | tee -a $OUT/call2-phases.txt
  B=0; [ $mode = burst ] && B=1
  BURST=$B timeout 270 python .carry/s38/cg/burst_ab.py --models llama3-8b --configs S1A1E8 --prefill 1x2048 --rounds 3 --recompile \
    --arm default --arm "cutlass: $P" > $OUT/call2-$mode.txt 2>&1; echo rc=$?
  grep -v -i warn $OUT/call2-$mode.txt | grep -v "^ *warnings\|_warn_once" | tail -12
done
echo "== end $(date -u +%T.%N)" | tee -a $OUT/call2-phases.txt
kill $SMI
date -u +%T
