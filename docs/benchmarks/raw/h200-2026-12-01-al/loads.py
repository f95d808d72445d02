"""Per-layer routed-expert loads of the benchmark's converted models on one random 1x2048 prefill (eager)."""
import torch
from cmoe import bench
from cmoe.moe import moe_layers
import cmoe.triton_experts as te

for name in ("llama3-8b",):
    for preset in ("S1A1E8", "S2A2E16"):
        model = bench.build_dense(name, layers=4)
        bench.convert_model_(model, preset)
        layers = moe_layers(model)
        for m in layers:
            m.expert_load.zero_()
            m.collect_load = True
        ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda")
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        for i, m in enumerate(layers):
            load = m.expert_load.long().tolist()
            P, E = sum(load), len(load)
            print(f"{name} {preset} layer {i}: loads {load}  mean {P / E:.0f} max {max(load)} "
                  f"(max/mean {max(load) * E / P:.2f}); C at factor 1.125 = {te.capacity(P, E)}", flush=True)
        del model
        torch.cuda.empty_cache()
