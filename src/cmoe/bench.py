"""Speed of converted vs dense LLaMA-shaped models on one GPU, against the roofline.

    python benchmarks/bench_speed.py                       # the whole table (H200: about 9 min per model)
    python benchmarks/bench_speed.py --models llama2-7b --configs S1A1E8 --decode-batches 1

For each model shape (random bf16 weights) and each CMoE config (converted with
``cmoe.convert_`` on random calibration tokens, so the router is the one the converter
computes from the hidden states it sees): check the fast MoE path against the loop oracle,
then time a prefill (the forward compiled with ``fullgraph=True``, replayed as a CUDA graph;
attention through SDPA's causal kernel, ``cmoe.attention``) and greedy decode steps
(``cmoe.generation``: static KV cache, decode step compiled with ``fullgraph=True`` and
captured in one CUDA graph), each with q/k/v as one GEMM (``cmoe.fused_qkv``): the same treatment
for dense and MoE. Per cell: time, ratio to dense, achieved GB/s (decode) or TFLOP/s (prefill),
and the roofline limit ratio
max(bytes/BW, flops/peak)_dense / (...)_moe, with the copy bandwidth BW and the bf16 matmul
peak measured at the start of the run, and bytes counting only the experts the routing touches
in that step.

With ``--coordinate-descent`` every compile of the run, dense and MoE alike, uses inductor's
coordinate-descent tuning, under which inductor also runs one-row matmuls (the dense FFN at batch 1)
as its own tuned reductions instead of cuBLAS's GEMVs: a stronger dense baseline at batch 1
(docs/benchmarks/speed-h200.md, "Run ab").

With ``--rest`` it also times each model shape with every FFN removed ("no FFN") and prints where
each cell's time goes: the rest of the forward, the FFNs in context (the cell's time minus the
rest) against their floor, and the best ratio that FFNs at their floor could give with the rest as
measured (``split_table``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
import torch._dynamo

from cmoe.fused_qkv import fused_qkv
from cmoe.generation import drop_static_caches, with_generation_setup

MODELS = {
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}
CONFIGS = ["S3A3E8", "S2A2E8", "S1A1E8", "S2A2E16"]
PREFILL = [(1, 2048), (8, 2048)]
DECODE_BATCHES = [1, 8, 32, 128, 256]
PROMPT = 512


# ----------------------------------------------------------------------------- machine ceilings
def shape_arg(text: str) -> tuple[int, int]:
    """An argparse ``type`` for "BxS" arguments (batch x sequence, calibration windows x length):
    "8x2048" -> (8, 2048); positive integers only."""
    b, x, s = text.partition("x")
    if not (x and b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxS with positive integers, e.g. 1x2048")
    return int(b), int(s)


def measure_ceilings(device="cuda") -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured now."""
    from triton.testing import do_bench

    n = 1 << 30  # 1 GiB buffers, far beyond L2
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median") / 1e3
    bw = 2 * n / t
    del a, b
    N = 8192
    x = torch.randn(N, N, device=device, dtype=torch.bfloat16)
    y = torch.randn(N, N, device=device, dtype=torch.bfloat16)
    t = do_bench(lambda: x @ y, warmup=100, rep=500, return_mode="median") / 1e3
    peak = 2 * N**3 / t
    return {"bandwidth_Bps": bw, "bf16_flops": peak}


# ----------------------------------------------------------------------------- models
def build_dense(name: str, device="cuda", dtype=torch.bfloat16, layers: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cmoe.attention import use_causal_sdpa

    kw = dict(MODELS[name])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, attn_implementation="sdpa")
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None
    model.requires_grad_(False)
    use_causal_sdpa(model)  # SDPA's causal kernel in the traced prefill (cmoe.attention)
    return model.eval()


NO_FFN = "no FFN"  # the config name of the rows timed with every FFN removed (--rest)


class NoFFN(torch.nn.Module):
    """Stands in for a decoder layer's FFN in the ``NO_FFN`` rows: returns zeros, so that timing
    the model times everything but the FFNs (attention, norms, embeddings, lm_head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def strip_ffn_(model) -> None:
    """Replace every decoder layer's FFN with ``NoFFN``, in place."""
    for layer in model.model.layers:
        layer.mlp = NoFFN()


def convert_model_(model, preset: str, calib_tokens=(2, 512), seed: int = 0) -> str:
    """Convert in place with ``cmoe.convert_`` on random calibration ids, every layer at the
    preset's S/A/E (uniform allocation, so that each cell measures that configuration); then the
    expert implementation "auto", with the Triton kernels registered."""
    from cmoe import CMoEConfig, convert_, set_expert_impl
    from cmoe.experts import _load_triton

    g = torch.Generator(device="cpu").manual_seed(seed)
    calib = torch.randint(0, model.config.vocab_size, calib_tokens, generator=g)
    cfg = CMoEConfig.parse(preset, calib_samples=calib_tokens[0], calib_seqlen=calib_tokens[1], allocation="uniform")
    convert_(model, cfg, calib.to(next(model.parameters()).device), device="cuda", progress=False)
    _load_triton()
    set_expert_impl(model, "auto")
    return f"cmoe.convert_ ({calib_tokens[0]}x{calib_tokens[1]} random calibration tokens, uniform allocation)"


def weight_bytes(model) -> dict:
    """Bytes of weights: total, FFN experts, router + bookkeeping (CMoE extras)."""
    from cmoe.moe import CMoEMLP

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "inv_freq" not in n)
    extra = 0
    for mod in model.modules():
        if isinstance(mod, CMoEMLP):
            extra += sum(p.numel() * p.element_size() for p in mod.router.parameters())
            extra += sum(b.numel() * b.element_size() for b in mod.router.buffers())
            extra += mod.neuron_index.numel() * mod.neuron_index.element_size()
            extra += mod.expert_load.numel() * mod.expert_load.element_size()
    return {"total": total, "router_and_bookkeeping": extra}


# ----------------------------------------------------------------------------- roofline accounting
@dataclass
class Cost:
    bytes: float
    flops: float

    def time(self, ceil: dict) -> float:
        return max(self.bytes / ceil["bandwidth_Bps"], self.flops / ceil["bf16_flops"])


def step_cost(model, batch: int, q_len: int, ctx: int, touched: list[int] | None = None) -> Cost:
    """Fewest bytes and flops of one forward of ``batch x q_len`` new tokens with ``ctx``
    positions visible at the end (KV cache read + written). ``touched[l]``: routed experts
    that layer l's routing used (None: dense, or all)."""
    c = model.config
    d, V = c.hidden_size, c.vocab_size
    hd = d // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    el = 2  # bf16
    tokens = batch * q_len
    attn_w = d * (d + 2 * kv) + d * d  # q, k, v, o
    byts = tokens * d * el  # embedding rows
    byts += V * d * el  # lm_head
    flops = 2 * batch * V * d  # lm_head on the last position only
    avg_ctx = ctx - (q_len - 1) / 2  # causal: mean positions attended
    for layer in model.model.layers:
        byts += attn_w * el + 2 * d * el  # projections + norms
        byts += batch * 2 * kv * ctx * el  # KV cache read (new rows written: included)
        flops += 2 * tokens * attn_w + 4 * tokens * avg_ctx * d
        byts += 2 * tokens * d * el * 2  # layer input/output activations (small at decode)
    ffn = ffn_cost(model, batch, q_len, touched)
    return Cost(byts + ffn.bytes, flops + ffn.flops)


def ffn_cost(model, batch: int, q_len: int, touched: list[int] | None = None) -> Cost:
    """The FFNs' share of ``step_cost``: their weights' bytes (routed experts: only those that
    ``touched[l]`` counts, all of them if None) and FLOPs; nothing for ``NoFFN``."""
    from cmoe.moe import CMoEMLP

    d = model.config.hidden_size
    el = 2  # bf16
    tokens = batch * q_len
    byts = flops = 0
    for li, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if isinstance(mlp, CMoEMLP):
            s = mlp.spec
            n_touch = s.num_experts if touched is None else touched[li]
            byts += (3 * d * s.shared_size + n_touch * 3 * d * s.expert_size + 2 * s.num_experts * d) * el
            flops += 2 * tokens * (3 * d * s.active_size + 2 * s.num_experts * d)
        elif not isinstance(mlp, NoFFN):
            f = mlp.gate_proj.weight.shape[0]
            byts += 3 * d * f * el
            flops += 2 * tokens * 3 * d * f
    return Cost(byts, flops)


@torch.no_grad()
def touched_experts(model, batch: int, prompt_len: int) -> list[int]:
    """Routed experts each layer's routing touches in one decode step after a random prompt:
    expert load of (prefill + 1 step) minus that of the same prefill alone (eager)."""
    from cmoe.generation import generate
    from cmoe.moe import moe_layers

    layers = moe_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=next(model.parameters()).device)
    loads = []
    for n in (2, 1):
        for m in layers:
            m.expert_load.zero_()
            m.collect_load = True
        generate(model, ids, n, compile=False)
        loads.append([m.expert_load.clone() for m in layers])
    for m in layers:
        m.collect_load = False
        m.expert_load.zero_()
    return [int(((a - b) > 0).sum()) for a, b in zip(*loads)]


# ----------------------------------------------------------------------------- checks
@torch.no_grad()
def check_fast_path(model, tokens=(1, 3, 17, 129, 300, 2048, 16384)) -> float:
    """Max relative error of the MoE layers' default forward vs the loop oracle on random
    hidden states of a few token counts; also checks the fused router against the torch one
    (same probabilities, same experts up to ties)."""
    from cmoe.moe import moe_layers

    worst, agree, total, perr = 0.0, 0, 0, 0.0
    for mod in moe_layers(model)[:4]:
        d = mod.spec.hidden_size
        for T in tokens:
            x = torch.randn(T, d, device=mod.shared_down.weight.device, dtype=mod.shared_down.weight.dtype)
            ref = mod.forward_reference(x).float()
            out = mod(x).float()
            worst = max(worst, ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item())
            if x.is_cuda:
                i0, w0, p0 = mod.router.forward_reference(x)
                i1, w1, p1 = mod.router(x)
                agree += int((i0 == i1).sum())
                total += i0.numel()
                perr = max(perr, (p1 - p0).abs().max().item())
    if total and (agree < 0.98 * total or perr > 1e-3):
        print(f"  CHECK FAILED: fused router vs torch router: {agree}/{total} same experts, max |dp| {perr:.2e}")
    elif total:
        print(f"  fused router vs torch router: {agree}/{total} same experts, max |dp| {perr:.2e}")
    return worst


# ----------------------------------------------------------------------------- timing
def prefill_forward(model, ids: torch.Tensor, compile: bool = True):
    """One prefill forward of ``ids`` (no KV cache, last position's logits), compiled with
    ``torch.compile(fullgraph=True, dynamic=False)`` (inductor fuses the norms, rotary and
    activations around the GEMMs; no CUDA graphs of its own) unless ``compile`` is False. Run it
    inside ``cmoe.attention.unpadded_prefill()`` so that attention uses SDPA's causal kernel."""

    def fwd():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return torch.compile(fwd, fullgraph=True, dynamic=False) if compile else fwd


@torch.no_grad()
def check_compiled_prefill(model, fwd, ids, log, label: str) -> None:
    """Checks the compiled prefill against the eager one. Dense: the last position's logits, per
    sequence, median relative error under 5e-2 (bf16 rounding of other fusions). MoE: the same
    distance is only logged, because under other rounding a token near a routing tie picks other
    experts, which moves its logits a lot (H200, LLaMA-2-7B shape with random weights: the loop
    oracle and the fast path differ too, 5 % of positions by more than 0.1); the check is then that
    each compiled MoE layer gives the eager layer's output on the same input (rel. error < 1e-3)."""
    from cmoe.moe import moe_layers

    ref = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()[:, -1]
    out = fwd().logits.float()[:, -1]
    rows = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    msg = f"  {label}: compiled vs eager logits, rel err median {rows.median():.1e} (max {rows.max():.1e}) over {len(rows)} rows"
    layers = moe_layers(model)
    if not layers:
        log(msg + ("" if rows.median() <= 5e-2 else "  CHECK FAILED"))
        return
    layer = layers[0]
    x = torch.randn(ids.numel(), layer.spec.hidden_size, device=ids.device, dtype=layer.shared_down.weight.dtype)
    y0, y1 = layer(x).float(), torch.compile(layer, fullgraph=True, dynamic=False)(x).float()
    err = ((y1 - y0).norm() / y0.norm()).item()
    log(msg + f"; one MoE layer at {len(x)} tokens, compiled vs eager: rel err {err:.1e}" + ("" if err < 1e-3 else "  CHECK FAILED"))


@torch.no_grad()
def time_prefill(fwd, repeats: int = 5) -> tuple[float, str]:
    """Median time of the prefill ``fwd()``, replayed as a CUDA graph (host overhead excluded,
    for dense and MoE alike); plain timing if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fwd()  # compiles, if fwd is compiled
            fwd()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fwd()
        t = _median_time(g.replay, repeats)
        del g
        return t, "graph"
    except Exception as e:  # noqa: BLE001
        print(f"  (prefill graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing without it)")
        torch.cuda.synchronize()
        return _median_time(fwd, repeats), "no graph"


def _median_time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


@dataclass
class Row:
    model: str
    config: str
    kind: str  # "prefill" | "decode"
    batch: int
    seq: int
    seconds: float
    cost: Cost
    ratio: float | None = None  # dense time / this time
    limit: float | None = None  # roofline limit ratio
    ffn: Cost | None = None  # the FFNs' share of ``cost``
    extra: dict = field(default_factory=dict)


def warm_up(model, name: str, args, ceil, log) -> None:
    """Run the first prefill cell and the first decode cell untimed: a process's first timed cell
    ran slow on the H200 (run o: dense decode b=128 2.204 ms first, 2.111 ms at the end of the same
    run), and dense is timed first, so without this the ratios would favour the MoE rows."""
    t0 = time.perf_counter()
    first = argparse.Namespace(**{**vars(args), "prefill": args.prefill[:1], "decode_batches": args.decode_batches[:1], "profile": False})
    bench_model(model, name, "dense", first, ceil, lambda msg: None)
    log(f"  warm-up (untimed): the first prefill and decode cells, {time.perf_counter() - t0:.0f} s")


def bench_model(model, name: str, config: str, args, ceil, log) -> list[Row]:
    from cmoe.attention import unpadded_prefill
    from cmoe.generation import time_generation

    rows = []
    moe = config not in ("dense", NO_FFN)
    for b, s in args.prefill:
        ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
        compiled = not (args.no_compile or args.eager_prefill)
        # random ids: no padding, SDPA's causal kernel; q/k/v as one GEMM (as in generation), dense and MoE alike
        with unpadded_prefill(), fused_qkv(model):
            fwd = prefill_forward(model, ids, compile=compiled)
            t, how = time_prefill(fwd)
            how = ("compiled" if compiled else "eager") + ", " + how
            if compiled:
                check_compiled_prefill(model, fwd, ids, log, f"prefill {b}x{s}")
            if getattr(args, "profile", False):
                profile_kernels(fwd, 2, log, f"prefill {b}x{s} ({how})")
        cost = step_cost(model, b, s, s, None)
        rows.append(Row(name, config, "prefill", b, s, t, cost, ffn=ffn_cost(model, b, s), extra={"timing": how}))
        log(f"  prefill {b}x{s}: {t * 1e3:.2f} ms  {cost.flops / t / 1e12:.0f} TFLOP/s ({how})")
        del fwd
        torch.cuda.empty_cache()
    for b in args.decode_batches:
        t0 = time.perf_counter()
        tg = time_generation(model, b, args.prompt, new_tokens=args.steps, compile=not args.no_compile, repeats=args.repeats)
        if getattr(args, "profile", False):
            profile_decode(model, b, args.prompt, args.steps, log)
        touched = touched_experts(model, b, args.prompt) if moe else None
        ctx = args.prompt + args.steps // 2
        cost = step_cost(model, b, 1, ctx, touched)
        rows.append(Row(name, config, "decode", b, args.prompt, tg.decode_s, cost, ffn=ffn_cost(model, b, 1, touched), extra={"touched": touched}))
        log(
            f"  decode b={b}: {tg.decode_s * 1e3:.3f} ms/step  {b / tg.decode_s:.0f} tok/s  "
            f"{cost.bytes / tg.decode_s / 1e9:.0f} GB/s  (wall {time.perf_counter() - t0:.0f} s)" + (f"  touched/layer avg {sum(touched) / len(touched):.1f}" if touched else "")
        )
        drop_static_caches(model)
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def profile_kernels(run, n: int, log, label: str, top: int = 40) -> None:
    """Call ``run()`` ``n`` times under torch.profiler and log, per call: wall time (host
    included), GPU busy time (sum of kernel times), GPU span, and the ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / n  # device_time in us
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / n if kernels else 0.0
    log(f"  profile {label}: wall {wall * 1e6:.1f} us (profiler on), GPU busy {busy:.1f} us, "
        f"GPU span {span:.1f} us, {len(kernels) / n:.0f} kernels")
    totals: dict[str, list] = {}
    for e in kernels:
        t = totals.setdefault(e.name[:90], [0.0, 0])
        t[0] += e.device_time / n
        t[1] += 1
    for name, (us, cnt) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        log(f"    {us:8.1f} us  {cnt / n:4.0f}x  {name}")


@torch.no_grad()
@with_generation_setup  # as time_generation ran it
def profile_decode(model, batch: int, prompt_len: int, steps: int, log, n: int = 8) -> None:
    """Where one compiled decode step's time goes (``profile_kernels`` over ``n`` steps)."""
    from cmoe.generation import _cache_kwarg, _forward_logits, decode_stepper, get_static_cache

    kw = _cache_kwarg(model)
    cache = get_static_cache(model, batch, prompt_len + steps + 1)  # the size time_generation compiled for
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    state = {"tok": _forward_logits(model, ids, torch.arange(prompt_len, device="cuda")[None], cache, kw).argmax(-1)[:, None]}
    step = decode_stepper(model, cache, kw, state["tok"], prompt_len, (False, 1.0, None, None), compile=True)

    def one_step():
        state["tok"] = step(state["tok"])

    for _ in range(2):
        one_step()
    profile_kernels(one_step, n, log, f"decode b={batch} (per step)")
    drop_static_caches(model)


def _cell(r: Row) -> tuple:
    return r.model, r.kind, r.batch, r.seq


def _cell_name(r: Row) -> str:
    return f"prefill {r.batch}x{r.seq}" if r.kind == "prefill" else f"decode b={r.batch}"


def fill_ratios(rows: list[Row], ceil: dict) -> None:
    dense = {_cell(r): r for r in rows if r.config == "dense"}
    for r in rows:
        d = dense.get(_cell(r))
        if d is None or r.config == NO_FFN:
            continue
        r.ratio = d.seconds / r.seconds
        r.limit = d.cost.time(ceil) / r.cost.time(ceil)


def table(rows: list[Row], ceil: dict) -> str:
    out = [
        "| model | config | cell | time | vs dense | achieved | roofline limit | % of limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.config == NO_FFN:
            continue
        cell = _cell_name(r)
        if r.kind == "prefill":
            tm = f"{r.seconds * 1e3:.1f} ms"
            ach = f"{r.cost.flops / r.seconds / 1e12:.0f} TFLOP/s"
        else:
            tm = f"{r.batch / r.seconds:.0f} tok/s ({r.seconds * 1e3:.2f} ms)"
            ach = f"{r.cost.bytes / r.seconds / 1e9:.0f} GB/s"
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        lim = f"{r.limit:.2f}x" if r.limit else "-"
        pct = f"{100 * r.ratio / r.limit:.1f} %" if r.ratio and r.limit else "-"
        out.append(f"| {r.model} | {r.config} | {cell} | {tm} | {ratio} | {ach} | {lim} | {pct} |")
    return "\n".join(out)


def split_table(rows: list[Row], ceil: dict) -> str:
    """Where each cell's time goes (``--rest``), from the ``NO_FFN`` row of the same cell: the rest
    of the forward; the FFNs in context (the model's time minus the rest); the FFNs' floor (their
    bytes at the copy bandwidth or their FLOPs at the bf16 peak, whichever takes longer); and the
    best ratio to dense that FFNs at that floor could give with the rest as measured, also as a
    share of the roofline limit ratio (where that share is under a target, no FFN kernel alone
    can meet it). Empty without ``NO_FFN`` rows."""
    rest = {_cell(r): r for r in rows if r.config == NO_FFN}
    dense = {_cell(r): r for r in rows if r.config == "dense"}
    out = [
        "| model | config | cell | rest (no FFN) | FFNs in context | FFNs' floor | floor / in context | best ratio | best / limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        k = _cell(r)
        if r.config == NO_FFN or k not in rest or k not in dense or r.ffn is None:
            continue
        t_rest, floor = rest[k].seconds, r.ffn.time(ceil)
        ffn = r.seconds - t_rest
        best = dense[k].seconds / (t_rest + floor)
        share = f"{100 * best / r.limit:.1f} %" if r.limit else "-"
        eff = f"{floor / ffn:.2f}" if ffn > 0 else "-"  # the rest can take longer than the whole, within the noise
        out.append(
            f"| {r.model} | {r.config} | {_cell_name(r)} | {t_rest * 1e6:.1f} us | {ffn * 1e6:.1f} us | "
            f"{floor * 1e6:.1f} us | {eff} | {best:.2f}x | {share} |"
        )
    return "\n".join(out) if len(out) > 2 else ""


def report(rows, memory, ceil, dev, out, log=None, notes=()) -> None:
    fill_ratios(rows, ceil)
    md = table(rows, ceil)
    split = split_table(rows, ceil)
    if split:
        md += "\n\nWhere the time goes (the rest of the forward timed with every FFN removed):\n\n" + split
    mem = ["| model | config | weights | vs dense | router + bookkeeping |", "| --- | --- | --- | --- | --- |"]
    dense_mem = {n: wb["total"] for n, c, wb in memory if c == "dense"}
    for n, c, wb in memory:
        if n in dense_mem:
            mem.append(
                f"| {n} | {c} | {wb['total'] / 2**30:.3f} GiB | {wb['total'] / dense_mem[n]:.4f} | "
                f"{wb['router_and_bookkeeping'] / 2**20:.2f} MiB ({100 * wb['router_and_bookkeeping'] / dense_mem[n]:.3f} %) |"
            )
    if log:
        log("\n" + md + "\n\n" + "\n".join(mem))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "speed.md"), "w") as f:
            f.write("\n".join(notes) + "\n\n")
            f.write(f"device: {dev}; copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s\n\n")
            f.write(md + "\n\n" + "\n".join(mem) + "\n")
        with open(os.path.join(out, "speed.json"), "w") as f:
            json.dump(
                {"device": dev, "ceilings": ceil, "rows": [r.__dict__ | {"cost": r.cost.__dict__, "ffn": r.ffn and r.ffn.__dict__} for r in rows],
                 "memory": memory},
                f, indent=1, default=str,
            )


def inductor_settings(args) -> dict:
    """The inductor settings that every compile of the run uses, dense and MoE alike."""
    return {"coordinate_descent_tuning": True} if args.coordinate_descent else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmoe bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real depth)")
    p.add_argument("--prefill", nargs="*", type=shape_arg, default=PREFILL, help="BxS cells")
    p.add_argument("--decode-batches", nargs="*", type=int, default=DECODE_BATCHES)
    p.add_argument("--prompt", type=int, default=PROMPT)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="run prefill and decode eagerly (decode without CUDA graphs)")
    p.add_argument("--eager-prefill", action="store_true", help="run the prefill forward eagerly (still replayed as a CUDA graph)")
    p.add_argument("--profile", action="store_true", help="print a kernel profile of each prefill and decode cell")
    p.add_argument("--rest", action="store_true",
                   help="also time each model with every FFN removed, and print where each cell's time goes: "
                        "the rest of the forward, the FFNs in context against their floor, and the best ratio FFNs at that floor could give")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="compile everything (dense and MoE alike) with inductor's coordinate-descent tuning, which also "
                        "turns one-row matmuls (the dense FFN at batch 1) into inductor's own reductions; compiles take longer")
    p.add_argument("--calib", type=shape_arg, default="2x512", help="calibration tokens NxS for convert_")
    p.add_argument("--out", default=None, help="write the table (markdown) and raw rows (json) here")
    args = p.parse_args(argv)
    calib = args.calib
    if not torch.cuda.is_available():
        print("bench_speed needs a CUDA GPU", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, flush=True)

    dev = torch.cuda.get_device_name()
    import transformers
    import triton

    notes = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {dev}; torch {torch.__version__}, "
        f"triton {triton.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"command: python benchmarks/bench_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}",
    ]
    settings = inductor_settings(args)
    if settings:
        notes.append(f"inductor settings (every compile, dense and MoE alike): {settings}")
    log("# " + "\n# ".join(notes))
    ceil = measure_ceilings()
    log(f"ceilings: copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s")
    rows: list[Row] = []
    memory = []
    with torch._inductor.config.patch(settings):
        for name in args.models:
            for config in ["dense"] + ([NO_FFN] if args.rest else []) + list(args.configs):
                t0 = time.perf_counter()
                model = build_dense(name, layers=args.layers)
                how = "dense"
                if config == NO_FFN:
                    strip_ffn_(model)
                    how = "every FFN replaced by zeros"
                elif config != "dense":
                    how = convert_model_(model, config, calib)
                    err = check_fast_path(model)
                    log(f"  check vs loop oracle: max rel err {err:.2e}")
                    if not err < 3e-2:
                        log(f"  CHECK FAILED: {name} {config}: fast path disagrees with the loop oracle ({err:.2e})")
                        notes.append(f"{name} {config}: CHECK FAILED vs loop oracle ({err:.2e})")
                wb = weight_bytes(model)
                if config != NO_FFN:
                    memory.append((name, config, wb))
                notes.append(f"{name} {config}: {how}")
                log(f"{name} {config}: built ({how}) in {time.perf_counter() - t0:.1f} s; weights {wb['total'] / 2**30:.2f} GiB")
                if not rows:
                    warm_up(model, name, args, ceil, log)
                rows += bench_model(model, name, config, args, ceil, log)
                del model
                torch._dynamo.reset()  # drop compiled graphs (and the CUDA graphs holding this model's memory)
                torch.cuda.empty_cache()
                report(rows, memory, ceil, dev, args.out, log=None, notes=notes)  # partial results, in case the run is cut
    report(rows, memory, ceil, dev, args.out, log=log, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
