"""Converted SmolLM2 (S3A3E8 and S1A1E8, wiki calibration 8x512): greedy tokens of the compiled CPU
decode step against the eager one, 32 new tokens after 4 wiki prompts of 32 tokens."""
import torch
from cmoe import CMoEConfig, convert_, load_model
from cmoe.data import calibration_tokens
from cmoe.generation import generate

dense, tok = load_model("smollm2", dtype=torch.float32, device="cpu")
dense.requires_grad_(False)
calib = calibration_tokens(tok, "wiki", 8, 512)
prompts = calibration_tokens(tok, "c4", 4, 32)
for cfg in ("S3A3E8", "S1A1E8"):
    import copy
    m = copy.deepcopy(dense)
    convert_(m, CMoEConfig.parse(cfg), calib)
    for row in prompts:
        ids = row[None]
        a = generate(m, ids, 32, compile=False)
        b = generate(m, ids, 32, compile=True)
        same = (a == b).all(1).item()
        first = int((a[0, 32:] != b[0, 32:]).nonzero()[0]) if not same else None
        print(cfg, "identical" if same else f"first difference at new token {first}", flush=True)
