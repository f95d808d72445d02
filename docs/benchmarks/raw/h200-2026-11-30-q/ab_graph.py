"""Session 12: is decode at batch 1 bound by the host? Per model (llama2-7b shape, 4 layers):
  ro     time_generation (torch.compile mode="reduce-overhead": cudagraph trees), wall per step
  host   the same loop's host time per step (enqueue only, no sync), measured separately
  graph  the step compiled without CUDA graphs (mode="default") and captured by hand in one
         torch.cuda.CUDAGraph with static tok/pos buffers, the next token and pos += 1 inside
         the graph; wall per step of back-to-back replays
    PYTHONPATH=src:benchmarks python .carry/s12/ab_graph.py [llama2-7b]
"""
import datetime
import sys
import time

import torch

from cmoe import bench
from cmoe.generation import _cache_kwarg, _decode_step, _forward_logits, _prepare_experts, get_static_cache, time_generation
from cmoe.moe import set_expert_impl

SHAPE = (sys.argv[1:] or ["llama2-7b"])[0]
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} {SHAPE}", flush=True)
STEP = torch.compile(_decode_step, fullgraph=True)  # inductor, no CUDA graphs


def reset(model):
    torch._dynamo.reset()
    model.__dict__.pop("_cmoe_static_caches", None)
    torch.cuda.empty_cache()


@torch.no_grad()
def ro_ms(model, b=1, n=32):
    reset(model)
    return time_generation(model, b, 512, new_tokens=n, compile=True, repeats=3).decode_s * 1e3


@torch.no_grad()
def graph_ms(model, b=1, n=32):
    reset(model)
    _prepare_experts(model)
    cache = get_static_cache(model, b, 512 + 3 * n + 8)
    kw = _cache_kwarg(model)
    ids = torch.randint(0, model.config.vocab_size, (b, 512), device="cuda")
    tok = _forward_logits(model, ids, torch.arange(512, device="cuda")[None], cache, kw).argmax(-1)[:, None]
    tok_in, pos_in = tok.clone(), torch.full((1, 1), 512, dtype=torch.long, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            STEP(model, cache, kw, tok_in, pos_in, False, 1.0, None, None)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        nxt = STEP(model, cache, kw, tok_in, pos_in, False, 1.0, None, None)
        tok_in.copy_(nxt)
        pos_in.add_(1)
    out = []
    for r in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out.append(((time.perf_counter() - t0) / n * 1e3, (t1 - t0) / n * 1e3))
    out.sort()
    return out[1]


@torch.no_grad()
def ro_host_ms(model, b=1, n=32):
    """Host time per step of the reduce-overhead loop, from a fresh cache (compiled already)."""
    from cmoe.generation import compiled_decode_step
    cache = get_static_cache(model, b, 512 + n + 1)
    kw = _cache_kwarg(model)
    step = compiled_decode_step()
    tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), 512, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        tok = step(model, cache, kw, tok.clone(), pos.clone(), False, 1.0, None, None)
        pos += 1
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e3, (time.perf_counter() - t0) / n * 1e3


dense = bench.build_dense(SHAPE, layers=4)
models = {"dense": dense}
for c in ("S1A1E8", "S2A2E8"):
    m = bench.build_dense(SHAPE, layers=4)
    bench.convert_model_(m, c, (2, 512))
    set_expert_impl(m, "auto")
    models[c] = m
for rnd in range(2):
    for name, m in models.items():
        ro = ro_ms(m)
        h = ro_host_ms(m)
        gw, gh = graph_ms(m)
        print(f"round {rnd} {name}: reduce-overhead {ro:.3f} ms/step (host {h[0]:.3f}, wall {h[1]:.3f}); "
              f"hand-captured graph {gw:.3f} ms/step (host {gh:.3f})", flush=True)
