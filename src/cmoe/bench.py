"""Speed of converted vs dense LLaMA-shaped models on one GPU, against the roofline.

    python benchmarks/bench_speed.py --layers 4            # the whole table (H200: about 7 min per model shape)
    python benchmarks/bench_speed.py --models llama2-7b --configs S1A1E8 --decode-batches 1

For each model shape (random bf16 weights) and each CMoE config (converted with
``cmoe.convert_`` on random calibration tokens, so the router is the one the converter
computes from the hidden states it sees): check the fast MoE path against the loop oracle,
then time a prefill (the forward compiled with ``fullgraph=True``, replayed as a CUDA graph;
attention through SDPA's causal kernel, ``cmoe.attention``; its sustained rate under the GPU's
power cap, ``block_time``) and greedy decode steps
(``cmoe.generation``: static KV cache, decode step compiled with ``fullgraph=True`` and
captured in one CUDA graph; their steady rate, ``time_decode``), each with q/k/v as one GEMM (``cmoe.fused_qkv``): the same treatment
for dense and MoE. One dense model per shape is timed alternately with each converted model in
turn, cell by cell, ``--rounds`` rounds (the order reversed every other round), so that the GPU's
drift over the run (its clock under the power cap) falls on both alike. Per cell: time (median
over the rounds; dense's over every round of every pairing), ratio to dense (the median of the
rounds' ratios) and their range, achieved GB/s (decode) or TFLOP/s (prefill), and the roofline
limit ratio
max(bytes/BW, flops/peak)_dense / (...)_moe, with the copy bandwidth BW and the bf16 matmul
peak measured at the start of the run, and bytes counting only the experts the routing touches
in that step. Below the table: how many converted cells meet issue 3's targets, and for each that
misses, by how much (``target_misses``).

With ``--coordinate-descent`` every compile of the run, dense and MoE alike, uses inductor's
coordinate-descent tuning, under which inductor also runs one-row matmuls (the dense FFN at batch 1)
as its own tuned reductions instead of cuBLAS's GEMVs: a stronger dense baseline at batch 1
(docs/benchmarks/speed-h200-log.md, "Run ab").

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
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch._dynamo

from cmoe import pdl
from cmoe.fused_qkv import fused_qkv
from cmoe.generation import block_time, drop_static_caches, with_generation_setup

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
ROUNDS = 3  # each converted model timed alternately with dense, this many rounds per cell (median)
# A prefill's time in one round: the mean over a block of at least PREFILL_REPLAYS replays and about
# PREFILL_BLOCK_S, after PREFILL_SETTLE_S of untimed replays. Under its power cap the H200's clock falls
# within a fraction of a second of prefill work and then swings by 10-35 % (nvidia-smi every 250 ms:
# 1,275-1,980 MHz), so a model's time depended on what ran before it (llama2-7b dense at 1x2048, one
# process, 5 replays after the other model's: 5.09-5.94 ms); settled, and over a block, it is the
# sustained rate of that work under the cap, for dense and MoE alike.
PREFILL_REPLAYS, PREFILL_SETTLE_S, PREFILL_BLOCK_S = 5, 0.3, 0.5
# issue 3's targets, per MoE cell: its ratio to dense at least NOT_SLOWER ("no cell slower than dense",
# within the run-to-run spread), and at least TARGET_SHARE of its roofline limit ratio (decode at batch 1:
# TARGET_SHARE_B1)
NOT_SLOWER, TARGET_SHARE, TARGET_SHARE_B1 = 0.995, 0.85, 0.90


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
ODD_TOKENS = (3, 17, 129, 300)  # token counts between the cells' sizes, checked against the loop oracle too


def oracle_tokens(args) -> list[int]:
    """The token counts ``check_fast_path`` checks: every cell's (each decode batch, each prefill's
    B x S) and ``ODD_TOKENS``, so that every path the timed cells take is checked."""
    return sorted({*args.decode_batches, *(b * s for b, s in args.prefill), *ODD_TOKENS})


@torch.no_grad()
def check_fast_path(model, tokens) -> float:
    """Max relative error of the MoE layers' default forward vs the loop oracle on random
    hidden states of each of ``tokens`` token counts (``oracle_tokens``); also checks the fused
    router against the torch one (same probabilities, same experts up to ties)."""
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
def capture_prefill(fwd) -> tuple[Callable[[], object], str]:
    """``fwd()`` compiled (if it is) and captured as a CUDA graph: (its replay, "graph"), so that
    timing excludes host overhead, for dense and MoE alike; (``fwd``, "no graph") if capture fails."""
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
        return g.replay, "graph"
    except Exception as e:  # noqa: BLE001
        print(f"  (prefill graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing without it)")
        torch.cuda.synchronize()
        return fwd, "no graph"


def replay_time(run, repeats: int = PREFILL_REPLAYS) -> float:
    """A captured prefill's time in one round: ``block_time`` of at least ``repeats`` replays of
    ``run`` after PREFILL_SETTLE_S of untimed ones, over about PREFILL_BLOCK_S."""
    return block_time(run, repeats, PREFILL_SETTLE_S, PREFILL_BLOCK_S)


def time_prefill(fwd, repeats: int = PREFILL_REPLAYS) -> tuple[float, str]:
    """The prefill ``fwd()``'s time (``capture_prefill``, then ``replay_time``)."""
    run, how = capture_prefill(fwd)
    return replay_time(run, repeats), how


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each timer called once per round, in turn, in reverse order every other round, so that drift
    over the run (the GPU's clock under its power cap, run ah) falls on every model alike:
    {name: [its time in each round]}."""
    names = list(timers)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(timers[n]())
    return out


@dataclass
class Row:
    model: str
    config: str
    kind: str  # "prefill" | "decode"
    batch: int
    seq: int
    seconds: float  # median over the rounds (dense: over every round of every pairing)
    cost: Cost
    ratio: float | None = None  # dense time / this time: the median of the rounds' ratios
    limit: float | None = None  # roofline limit ratio
    ffn: Cost | None = None  # the FFNs' share of ``cost``
    extra: dict = field(default_factory=dict)  # "rounds": seconds per round; "dense_rounds": dense's, the same rounds


Cell = tuple[str, int, int]  # ("prefill", B, S) or ("decode", B, prompt length)


def cells_of(args) -> list[Cell]:
    return [("prefill", b, s) for b, s in args.prefill] + [("decode", b, args.prompt) for b in args.decode_batches]


def cell_name(cell: Cell) -> str:
    kind, b, s = cell
    return f"prefill {b}x{s}" if kind == "prefill" else f"decode b={b}"


@torch.no_grad()
def time_prefill_cell(models: dict, cell: Cell, args, log, checked: set) -> tuple[dict[str, list[float]], str]:
    """The models' prefill of ``cell`` on the same random ids, each compiled and captured first,
    then timed in turn over ``args.rounds`` rounds (``interleaved``; ``replay_time`` per round). The
    compiled forward is checked against the eager one (and profiled with
    ``--profile``) once per model, the first time it meets the cell (``checked``)."""
    from cmoe.attention import unpadded_prefill

    _, b, s = cell
    compiled = not (args.no_compile or args.eager_prefill)
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (b, s), device="cuda", generator=gen)
    runs, how = {}, ""
    # random ids: no padding, SDPA's causal kernel; q/k/v as one GEMM (as in generation), dense and MoE alike
    with unpadded_prefill(), ExitStack() as fused:
        for name, model in models.items():
            fused.enter_context(fused_qkv(model))
            fwd = prefill_forward(model, ids, compile=compiled)
            runs[name], how = capture_prefill(fwd)
            how = ("compiled" if compiled else "eager") + ", " + how
            if (name, cell) not in checked:
                checked.add((name, cell))
                if compiled:
                    check_compiled_prefill(model, fwd, ids, log, f"{name} {cell_name(cell)}")
                if getattr(args, "profile", False):
                    profile_kernels(fwd, 2, log, f"{name} {cell_name(cell)} ({how})")
        times = interleaved({n: (lambda run=run: replay_time(run)) for n, run in runs.items()}, args.rounds)
    del runs
    torch.cuda.empty_cache()
    return times, how


@torch.no_grad()
def time_decode_cell(models: dict, cell: Cell, args, log, checked: set) -> dict[str, list[float]]:
    """The models' greedy decode step at ``cell``'s batch after its prompt, each compiled and
    captured first, then timed in turn over ``args.rounds`` rounds (``interleaved``): per round,
    ``time_decode``'s steady rate (passes of ``args.steps`` steps over the same positions, settled,
    then a block of at least ``args.repeats`` passes); their static caches dropped after. Profiled
    with ``--profile`` once per model (``checked``)."""
    from cmoe.generation import time_decode

    _, b, prompt = cell

    def timer(model) -> Callable[[], float]:
        return lambda: time_decode(model, b, prompt, steps=args.steps, compile=not args.no_compile, min_passes=args.repeats)

    for name, model in models.items():
        timer(model)()  # compiled and captured, untimed
        if (name, cell) not in checked:
            checked.add((name, cell))
            if getattr(args, "profile", False):
                profile_decode(model, b, prompt, args.steps, log)
    times = interleaved({n: timer(m) for n, m in models.items()}, args.rounds)
    for model in models.values():
        drop_static_caches(model)
    torch.cuda.empty_cache()
    return times


def time_cell(models: dict, cell: Cell, args, log, checked: set) -> tuple[dict[str, list[float]], str]:
    """{model name: its time in each round} for one cell, and how prefill was run ("" for decode)."""
    if cell[0] == "prefill":
        return time_prefill_cell(models, cell, args, log, checked)
    return time_decode_cell(models, cell, args, log, checked), ""


def cell_cost(model, cell: Cell, moe: bool, args) -> tuple[Cost, Cost, list[int] | None]:
    """(the cell's roofline cost, the FFNs' share of it, the routed experts each layer touched in a
    decode step: None for prefill and for models without routing)."""
    kind, b, s = cell
    if kind == "prefill":
        return step_cost(model, b, s, s, None), ffn_cost(model, b, s), None
    touched = touched_experts(model, b, s) if moe else None
    ctx = s + args.steps // 2
    return step_cost(model, b, 1, ctx, touched), ffn_cost(model, b, 1, touched), touched


def warm_up(model, args, log) -> None:
    """Run the first prefill cell and the first decode cell untimed: a process's first timed cell
    ran slow on the H200 (run o: dense decode b=128 2.204 ms first, 2.111 ms at the end of the same
    run)."""
    t0 = time.perf_counter()
    quiet = argparse.Namespace(**{**vars(args), "profile": False, "rounds": 1})
    first = cells_of(argparse.Namespace(prefill=args.prefill[:1], decode_batches=args.decode_batches[:1], prompt=args.prompt))
    for cell in first:
        time_cell({"dense": model}, cell, quiet, lambda msg: None, set())
    log(f"  warm-up (untimed): the first prefill and decode cells, {time.perf_counter() - t0:.0f} s")


def bench_pair(dense, model, name: str, config: str, args, log, checked: set, dense_times: dict) -> list[Row]:
    """Every cell of ``config`` (``model``; None: dense alone), timed alternately with ``dense``
    (``time_cell``); ``dense_times[cell]`` collects dense's time of every round. ``config``'s rows."""
    rows = []
    models = {"dense": dense} if model is None else {"dense": dense, config: model}
    moe = config not in ("dense", NO_FFN)
    for cell in cells_of(args):
        t0 = time.perf_counter()
        times, how = time_cell(models, cell, args, log, checked)
        dense_times.setdefault(cell, []).extend(times["dense"])
        if model is None:
            continue
        cost, ffn, touched = cell_cost(model, cell, moe, args)
        t = statistics.median(times[config])
        kind, b, seq = cell
        extra = {"rounds": times[config], "dense_rounds": times["dense"]}
        if how:
            extra["timing"] = how
        if touched:
            extra["touched"] = touched
        rows.append(Row(name, config, kind, b, seq, t, cost, ffn=ffn, extra=extra))
        per_round = " ".join(f"{d / m:.4f}x" for d, m in zip(times["dense"], times[config]))
        rate = f"{cost.flops / t / 1e12:.0f} TFLOP/s" if kind == "prefill" else f"{b / t:.0f} tok/s  {cost.bytes / t / 1e9:.0f} GB/s"
        log(
            f"  {cell_name(cell)}: {t * 1e3:.4f} ms  {rate}  vs dense, per round: {per_round}  (wall {time.perf_counter() - t0:.0f} s)"
            + (f"  touched/layer avg {sum(touched) / len(touched):.1f}" if touched else "")
        )
    return rows


def dense_rows(dense, name: str, args, dense_times: dict) -> list[Row]:
    """Dense's rows: per cell, the median of its times over every round of every pairing."""
    rows = []
    for cell in cells_of(args):
        if cell in dense_times:
            cost, ffn, _ = cell_cost(dense, cell, False, args)
            t = statistics.median(dense_times[cell])
            rows.append(Row(name, "dense", cell[0], cell[1], cell[2], t, cost, ffn=ffn, extra={"rounds": dense_times[cell]}))
    return rows


@torch.no_grad()
def profile_kernels(run, n: int, log, label: str, top: int = 40) -> None:
    """Call ``run()`` ``n`` times under torch.profiler and log, per call: wall time (host
    included), GPU busy time (sum of kernel times), GPU span, and the ``top`` kernels by time.
    It cannot show how two streams overlap: in run aq's trace of a replayed prefill on the H200
    (docs/benchmarks/speed-h200-log.md), the profiled kernels ran one at a time, the second stream's
    among them, with 40-190 us gaps between them."""
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
@with_generation_setup  # as time_decode ran it
def profile_decode(model, batch: int, prompt_len: int, steps: int, log, n: int = 8) -> None:
    """Where one compiled decode step's time goes (``profile_kernels`` over ``n`` steps)."""
    from cmoe.generation import _cache_kwarg, _forward_logits, decode_stepper, get_static_cache

    kw = _cache_kwarg(model)
    cache = get_static_cache(model, batch, prompt_len + steps + 1)  # the size time_decode compiled for
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
    return cell_name((r.kind, r.batch, r.seq))


def fill_ratios(rows: list[Row], ceil: dict) -> None:
    """Each row's ratio to dense (the median of the per-round ratios where the rounds were timed
    alternately, ``extra["dense_rounds"]``; also their range, ``extra["ratio_range"]``) and its
    roofline limit ratio."""
    dense = {_cell(r): r for r in rows if r.config == "dense"}
    for r in rows:
        d = dense.get(_cell(r))
        if d is None or r.config == NO_FFN:
            continue
        per_round = [a / b for a, b in zip(r.extra.get("dense_rounds", ()), r.extra.get("rounds", ()))]
        r.ratio = statistics.median(per_round) if per_round else d.seconds / r.seconds
        if per_round:
            r.extra["ratio_range"] = (min(per_round), max(per_round))
        r.limit = d.cost.time(ceil) / r.cost.time(ceil)


def target_misses(rows: list[Row]) -> tuple[int, list[str]]:
    """(how many MoE cells there are, one line per cell that misses a target of issue 3: at least
    NOT_SLOWER x dense, TARGET_SHARE of the roofline limit ratio, TARGET_SHARE_B1 at decode batch 1;
    with the time per step it would have to lose, estimated from its median time and ratio)."""
    n, misses = 0, []
    for r in rows:
        if r.config in ("dense", NO_FFN) or r.ratio is None or r.limit is None:
            continue
        n += 1
        share = TARGET_SHARE_B1 if (r.kind, r.batch) == ("decode", 1) else TARGET_SHARE
        need = max(NOT_SLOWER, share * r.limit)
        if r.ratio < need:
            short = r.seconds * (1 - r.ratio / need)
            misses.append(f"{r.model} {r.config} {_cell_name(r)}: {r.ratio:.4f}x, {100 * r.ratio / r.limit:.1f} % of its limit "
                          f"{r.limit:.3f}x; about {short * 1e6:.0f} us short of {need:.4f}x")
    return n, misses


def table(rows: list[Row], ceil: dict) -> str:
    out = [
        "| model | config | cell | time | vs dense | rounds (vs dense) | achieved | roofline limit | % of limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.config == NO_FFN:
            continue
        cell = _cell_name(r)
        if r.kind == "prefill":
            tm = f"{r.seconds * 1e3:.3f} ms"
            ach = f"{r.cost.flops / r.seconds / 1e12:.0f} TFLOP/s"
        else:
            tm = f"{r.batch / r.seconds:.0f} tok/s ({r.seconds * 1e3:.4f} ms)"
            ach = f"{r.cost.bytes / r.seconds / 1e9:.0f} GB/s"
        ratio = f"{r.ratio:.4f}x" if r.ratio else "-"
        lo_hi = r.extra.get("ratio_range")
        spread = f"{lo_hi[0]:.4f}-{lo_hi[1]:.4f}x ({len(r.extra['rounds'])})" if lo_hi else "-"
        lim = f"{r.limit:.3f}x" if r.limit else "-"
        pct = f"{100 * r.ratio / r.limit:.1f} %" if r.ratio and r.limit else "-"
        out.append(f"| {r.model} | {r.config} | {cell} | {tm} | {ratio} | {spread} | {ach} | {lim} | {pct} |")
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
    n, misses = target_misses(rows)
    if n:
        md += (f"\n\nTargets: {n - len(misses)} of {n} MoE cells meet every target (at least {NOT_SLOWER}x dense, "
               f"{TARGET_SHARE:.0%} of the roofline limit ratio, {TARGET_SHARE_B1:.0%} at decode batch 1)"
               + "".join(f"\n- {m}" for m in misses))
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
    p.add_argument("--steps", type=int, default=32, help="decode steps per pass (over the same positions)")
    p.add_argument("--repeats", type=int, default=1, help="timed decode passes per round, at least")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help="rounds per cell: each converted model is timed alternately with dense, and its ratio to dense "
                        "is the median of the rounds' ratios")
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
    notes.append(f"decode steps' kernels launched with programmatic dependent launch (cmoe.pdl, dense and MoE alike): "
                 f"{'yes' if pdl.on('cuda') else 'no'}")
    log("# " + "\n# ".join(notes))
    ceil = measure_ceilings()
    log(f"ceilings: copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s")
    # every model of a shape compiles the same prefill and decode functions: one cache entry per model and cell
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows: list[Row] = []
    memory = []
    checked: set = set()
    with torch._inductor.config.patch(settings):
        for name in args.models:
            dense = build_dense(name, layers=args.layers)
            memory.append((name, "dense", weight_bytes(dense)))
            log(f"{name} dense: built; weights {memory[-1][2]['total'] / 2**30:.2f} GiB")
            warm_up(dense, args, log)
            dense_times: dict = {}
            shape_rows: list[Row] = []
            for config in ([NO_FFN] if args.rest else []) + list(args.configs) or [None]:
                model = None
                if config is not None:
                    t0 = time.perf_counter()
                    model = build_dense(name, layers=args.layers)
                    if config == NO_FFN:
                        strip_ffn_(model)
                        how = "every FFN replaced by zeros"
                    else:
                        how = convert_model_(model, config, calib)
                        err = check_fast_path(model, oracle_tokens(args))
                        log(f"  check vs loop oracle: max rel err {err:.2e}")
                        if not err < 3e-2:
                            log(f"  CHECK FAILED: {name} {config}: fast path disagrees with the loop oracle ({err:.2e})")
                            notes.append(f"{name} {config}: CHECK FAILED vs loop oracle ({err:.2e})")
                        memory.append((name, config, weight_bytes(model)))
                    notes.append(f"{name} {config}: {how}")
                    log(f"{name} {config}: built ({how}) in {time.perf_counter() - t0:.1f} s; timed alternately with dense, "
                        f"{args.rounds} rounds per cell")
                shape_rows += bench_pair(dense, model, name, config, args, log, checked, dense_times)
                del model
                torch.cuda.empty_cache()
                log(f"  GPU memory allocated after it: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
                report(rows + dense_rows(dense, name, args, dense_times) + shape_rows, memory, ceil, dev, args.out, notes=notes)
            rows += dense_rows(dense, name, args, dense_times) + shape_rows
            del dense
            torch._dynamo.reset()  # drop compiled graphs
            torch.cuda.empty_cache()
    report(rows, memory, ceil, dev, args.out, log=log, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
