"""A/B in one run: the compiled 1x2048 prefill on the grouped path's pointer kernels and on its TMA
kernels (GROUPED_TMA, tma-kernels.patch) with two tile configurations, alternating; the shared expert
on the second stream (SHARED_STREAM) throughout."""
import datetime
import torch
from cmoe import bench
from cmoe import triton_experts as te
from cmoe.attention import unpadded_prefill
from cmoe.experts import _load_triton
from cmoe.moe import set_expert_impl

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} prefill 1x2048", flush=True)
for name, config in (("llama3-8b", "S1A1E8"), ("llama2-7b", "S1A1E8")):
    model = bench.build_dense(name, layers=4)
    bench.convert_model_(model, config, (2, 512))
    _load_triton()
    set_expert_impl(model, "auto")
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda")
    B64, B128 = dict(bt=64, gate_up=(128, 64, 4, 4), down=(256, 64, 8, 4)), dict(bt=128, gate_up=(128, 64, 8, 3), down=(256, 64, 8, 3))
    for tma, cfg in ((False, None), (True, B128), (True, B64), (False, None), (True, B128), (True, B64)):
        stream = True
        te.GROUPED_TMA, te.SHARED_STREAM = tma, stream
        if cfg:
            te.GROUPED_TMA_CONFIG = cfg
        torch._dynamo.reset()
        with unpadded_prefill():
            fwd = bench.prefill_forward(model, ids)
            t, how = bench.time_prefill(fwd)
        print(f"{name} {config} tma={tma} {cfg} stream={stream}: {t * 1e3:.3f} ms", flush=True)
        del fwd
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
