"""A/B in one run: the compiled 1x2048 prefill with the grouped path's TMA kernels (GROUPED_TMA) on
and off, alternating, with the shared expert on the second stream (SHARED_STREAM) and without."""
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
    for tma, stream in ((False, True), (True, True), (False, True), (True, True), (False, False), (True, False)):
        te.GROUPED_TMA, te.SHARED_STREAM = tma, stream
        torch._dynamo.reset()
        with unpadded_prefill():
            fwd = bench.prefill_forward(model, ids)
            t, how = bench.time_prefill(fwd)
        print(f"{name} {config} tma={tma} stream={stream}: {t * 1e3:.3f} ms", flush=True)
        del fwd
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
