"""Time and profile the demo's conversion (default recipe, S3A3E8, wiki calibration) on the
first N decoder layers of SmolLM2-135M-Instruct, on the CPU.

    python profile_convert.py 3                                   # the installed cmoe
    PYTHONPATH=/path/to/worktree-at-e3e9a4a/src python profile_convert.py 3
"""
import cProfile
import pstats
import sys
import time

import torch

from cmoe import data
from cmoe.config import CMoEConfig
from cmoe.convert import convert_
from cmoe.loading import DEMO_MODEL, load_model

n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
model, tok = load_model(DEMO_MODEL)
model.model.layers = model.model.layers[:n]
model.config.num_hidden_layers = n
cfg = CMoEConfig.parse("S3A3E8")
ids = data.calibration_tokens(tok, "wiki", cfg.calib_samples, cfg.calib_seqlen, seed=cfg.seed)
start = time.time()
prof = cProfile.Profile()
prof.enable()
convert_(model, cfg, ids, progress=False)
prof.disable()
print(f"convert_ on {n} layers: {time.time() - start:.1f} s, {torch.get_num_threads()} threads, torch {torch.__version__}")
pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
