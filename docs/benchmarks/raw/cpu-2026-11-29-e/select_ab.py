"""A/B of the CPU decode path (experts "select"): the previous code (two matmuls per expert, the
shared expert apart) against the current one, in one process. Part 1: one FFN layer of SmolLM2's
shape at one token. Part 2 (--model): greedy decode of converted SmolLM2 S3A3E8. Results: select-ab.txt."""
import copy, sys
import time, torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from cmoe import experts
from cmoe.experts import _glu
from cmoe.moe import CMoEMLP, MoELayerSpec
torch.manual_seed(0)
d, f = 576, 1536
def old_select(x, idx, weight, gate_up, down, act):
    out = torch.zeros_like(x)
    for t, (es, ws) in enumerate(zip(idx.tolist(), weight.tolist())):
        for e, w in zip(es, ws):
            out[t] += (_glu(x[t] @ gate_up[e].T, act) @ down[e].T) * w
    return out
new_select = experts.EXPERT_IMPLS["select"]
def moe(S, A, E):
    m = f // E
    mod = CMoEMLP(MoELayerSpec(d, S * m, E - S, m, A, "silu", "linear")).eval()
    with torch.no_grad():
        for p in mod.parameters(): p.normal_(std=0.02)
        mod.router.scale.zero_()
    return mod
dense = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f)).eval()
mods = {"S3A3E8": moe(3, 3, 8), "S1A1E8": moe(1, 1, 8)}
x = torch.randn(1, 1, d)
def t(fn, n=300):
    for _ in range(20): fn()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t0) / n * 1e6
res = {}
with torch.no_grad():
    for r in range(7):
        res.setdefault("dense", []).append(t(lambda: dense(x)))
        for k, mod in mods.items():
            for variant in ("old", "new"):
                experts.EXPERT_IMPLS["select"] = old_select if variant == "old" else new_select
                experts.FUSES_SHARED.discard("select") if variant == "old" else experts.FUSES_SHARED.add("select")
                res.setdefault(f"{k} {variant}", []).append(t(lambda: mod(x)))
                res.setdefault(f"{k} {variant} router", []).append(t(lambda: mod.router(x.view(1, d))))
for k, v in res.items():
    v.sort(); print(f"{k}: median {v[len(v)//2]:.1f} us, min {v[0]:.1f}")


if "--model" in sys.argv:
    from cmoe import CMoEConfig, convert_, load_model
    from cmoe.data import calibration_tokens
    from cmoe.generation import time_generation

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
