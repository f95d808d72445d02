import copy, time, torch
from cmoe import CMoEConfig, convert_, load_model, experts
from cmoe.experts import _glu
from cmoe.data import calibration_tokens
from cmoe.generation import time_generation
def old_select(x, idx, weight, gate_up, down, act):
    out = torch.zeros_like(x)
    for t, (es, ws) in enumerate(zip(idx.tolist(), weight.tolist())):
        for e, w in zip(es, ws):
            out[t] += (_glu(x[t] @ gate_up[e].T, act) @ down[e].T) * w
    return out
new_select = experts.EXPERT_IMPLS["select"]
def use(variant):
    experts.EXPERT_IMPLS["select"] = old_select if variant == "old" else new_select
    (experts.FUSES_SHARED.discard if variant == "old" else experts.FUSES_SHARED.add)("select")
dense, tok = load_model("smollm2", dtype=torch.float32, device="cpu")
dense.requires_grad_(False); dense.generation_config.eos_token_id = None
calib = calibration_tokens(tok, "wiki", 8, 512)
model = copy.deepcopy(dense)
convert_(model, CMoEConfig.parse("S3A3E8", calib_samples=8, calib_seqlen=512, allocation="uniform"), calib, device="cpu", progress=False)
model.requires_grad_(False)
tps = lambda m: time_generation(m, 1, 32, 16, compile=False, repeats=1).decode_tokens_per_s
for r in range(4):
    d = tps(dense)
    use("old"); o = tps(model)
    use("new"); n = tps(model)
    print(f"round {r}: dense {d:.1f}, S3A3E8 old select {o:.1f} ({o/d:.2f}x), new select {n:.1f} ({n/d:.2f}x)", flush=True)
