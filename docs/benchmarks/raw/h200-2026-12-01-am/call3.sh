# Session 34, call 3 (branch gate-up-paired): A/B of the paired gate/up kernel in the prefill forward (1x2048)
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
P="cmoe.triton_experts.GROUPED_CONFIGS = [(512, {'bt': 64, 'gate_up': (64, 64, 4, 4), 'down': (128, 64, 4, 4)}), (1024, {'bt': 128, 'gate_up': (64, 64, 8, 3), 'down': (128, 64, 8, 3)}), (None, {'bt': 128, 'gate_up': (128, 64, 8, 4), 'down': (256, 64, 8, 4), 'paired': True})]"
timeout 500 python benchmarks/bench_ab.py --models llama3-8b llama2-7b --configs S1A1E8 S2A2E16 --prefill 1x2048 --rounds 3 \
  --arm default --arm "paired: $P" > $OUT/ab-paired.txt 2>&1; echo rc=$?
grep -v "^#" $OUT/ab-paired.txt | grep -v -i warn | tail -12
date -u +%T
