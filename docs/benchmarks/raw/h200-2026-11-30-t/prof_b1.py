"""Session 15 (copy of session 13's script; q/k/v fused by profile_decode since 3f25e1b): every kernel of one captured decode step at batch 1 (dense and one MoE config).

    PYTHONPATH=src:benchmarks python .carry/s15/prof_b1.py llama2-7b S2A2E8
"""
import datetime
import sys

import torch

from cmoe import bench
from cmoe.moe import set_expert_impl

SHAPE, CONFIG = (sys.argv[1:3] + ["llama2-7b", "S2A2E8"][len(sys.argv[1:3]):])
log = lambda m: print(m, flush=True)
log(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE} {CONFIG}")
dense = bench.build_dense(SHAPE, layers=4)
bench.profile_kernels.__defaults__ = (60,)
log("dense")
bench.profile_decode(dense, 1, 512, 32, log)
del dense
moe = bench.build_dense(SHAPE, layers=4)
bench.convert_model_(moe, CONFIG, (2, 512))
set_expert_impl(moe, "auto")
log(CONFIG)
bench.profile_decode(moe, 1, 512, 32, log)
