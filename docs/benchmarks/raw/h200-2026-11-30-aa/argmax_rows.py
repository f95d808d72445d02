"""Session 22: compiled greedy argmax, torch.argmax against argmax_last's two passes, by rows."""
import datetime

import torch
import triton.testing

from cmoe import generation

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
generation.ARGMAX_SPLIT_MAX_ROWS = 10**9
for V in (32000, 128256):
    for B in (16, 32, 64, 128):
        xs = [torch.randn(B, V, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        ref = torch.compile(lambda x: x.argmax(-1), fullgraph=True)
        new = torch.compile(generation.argmax_last, fullgraph=True)
        ok = all(torch.equal(ref(x), new(x)) for x in xs)
        t_ref = triton.testing.do_bench_cudagraph(lambda: [ref(x) for x in xs], rep=200) * 1e3 / 8
        t_new = triton.testing.do_bench_cudagraph(lambda: [new(x) for x in xs], rep=200) * 1e3 / 8
        print(f"argmax B={B} V={V}: torch.argmax {t_ref:.2f} us, two passes {t_new:.2f} us ({t_ref / t_new:.2f}x), equal {ok}", flush=True)
