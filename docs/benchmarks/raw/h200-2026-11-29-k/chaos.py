"""Is the compiled-vs-eager gap of the MoE prefill routing ties or a fault? (llama2-7b shape, 4 layers)
1. one MoE layer, eager vs compiled (inductor), 16,384 tokens: must agree to rounding;
2. the whole model, 8x2048, logits of every position: compiled vs eager and loop oracle vs eager,
   per-position relative error (median, p99, share over 0.1)."""
import sys, torch
from cmoe.bench import build_dense, convert_model_, prefill_forward
from cmoe.attention import unpadded_prefill
from cmoe.moe import set_expert_impl, moe_layers
from cmoe.experts import _load_triton

def per_pos(out, ref):
    out, ref = out.float().flatten(0, 1), ref.float().flatten(0, 1)
    e = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    return f"median {e.median():.1e}, p99 {e.quantile(0.99):.1e}, max {e.max():.1e}, share > 0.1: {(e > 0.1).float().mean():.4f}"

torch.manual_seed(0)
for config in sys.argv[1:]:
    model = build_dense("llama2-7b", layers=4)
    if config != "dense":
        convert_model_(model, config)
        _load_triton(); set_expert_impl(model, "auto")
        layer = moe_layers(model)[0]
        x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = layer(x); torch._dynamo.reset()
            out = torch.compile(layer, fullgraph=True)(x)
        print(f"{config}: one layer at 16384 tokens, compiled vs eager: max |diff| {(out - ref).abs().max().item():.3e}, rel {((out-ref).float().norm()/ref.float().norm()).item():.2e}", flush=True)
    ids = torch.randint(0, model.config.vocab_size, (8, 2048), device="cuda")
    with torch.no_grad(), unpadded_prefill():
        ref = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        f = torch.compile(lambda: model(input_ids=ids, use_cache=False).logits, fullgraph=True, dynamic=False)
        print(f"{config}: every position, compiled vs eager: {per_pos(f(), ref)}", flush=True)
        if config != "dense":
            set_expert_impl(model, "loop")
            print(f"{config}: every position, loop oracle vs eager: {per_pos(model(input_ids=ids, use_cache=False).logits, ref)}", flush=True)
    del model, ref, f; torch.cuda.empty_cache()
