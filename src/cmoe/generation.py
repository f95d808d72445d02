"""Compiled generation for dense and converted models alike (the fair baseline for speed).

gpt-fast's recipe on a Hugging Face causal LM: a static KV cache, an eager prefill, then a
one-token decode step compiled with ``torch.compile(fullgraph=True)``. On the GPU the compiled
step is captured once in a CUDA graph that also feeds its tokens back and advances the position,
so a decode step costs the host one replay (about 5 us; ``mode="reduce-overhead"`` took
0.2-0.4 ms of host time per step on the H200's host, near the GPU time of a batch-1 step, run q
in docs/benchmarks/speed-h200-log.md). Caches that keep state on the host (sliding-window layers)
use ``mode="reduce-overhead"`` instead. Sampling happens inside the step, and the loop never waits
on the GPU, except every ``stop_check_every`` steps when ``eos_token_id`` is given. Attentions
compute q, k and v with one GEMM while generating (``cmoe.fused_qkv``; no weight is copied), and on
a GPU the decode steps' attention runs in one Triton launch (``cmoe.attention.decode_attention_on``)
and, at batch 1, the attention projections as one-launch GEMVs (``cmoe.gemv``). Greedy decoding
takes the argmax over the vocabulary in two passes (``argmax_last``).

    from cmoe.generation import generate, time_decode, time_generation
    out = generate(model, input_ids, max_new_tokens=64)              # greedy, [B, S + 64]
    out = generate(model, input_ids, 64, do_sample=True, top_p=0.9)
    t = time_generation(model, batch_size=8, prompt_len=512, new_tokens=64)
    s = time_decode(model, batch_size=8, prompt_len=512)              # seconds per step, steady rate

Prompts of one batch share their length (no padding); positions run from 0.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import pdl
from .attention import decode_attention_on
from .fused_qkv import fused_qkv

try:  # transformers >= 5: static layers track their length on the device
    from transformers import StaticCache
except ImportError:  # pragma: no cover
    StaticCache = None


# ----------------------------------------------------------------------------- setup
GEMV_PROJECTIONS = True  # on a GPU, the attention projections of one-row steps through cmoe.gemv


@contextmanager
def generation_setup(model):
    """What generating runs a model with, and what timing it measures: q, k and v as one GEMM
    (``cmoe.fused_qkv``) and, on a GPU, the decode steps' attention in one launch
    (``cmoe.attention.decode_attention_on``) and, at batch 1, the attention projections as
    one-launch GEMVs (``cmoe.gemv.gemv_projections``); the model as it was on exit."""
    with fused_qkv(model), decode_attention_on(model), _gpu_setup(model):
        yield


@contextmanager
def _gpu_setup(model):
    """For a model on a GPU: the Triton expert kernels registered before tracing (an import inside
    a traced function would break the graph), and ``gemv_projections`` (GEMV_PROJECTIONS)."""
    p = next(model.parameters(), None)
    if p is None or not p.is_cuda:
        yield
        return
    from .experts import _load_triton
    from .gemv import gemv_projections  # Triton: only on a GPU

    _load_triton()
    if not GEMV_PROJECTIONS:
        yield
        return
    with gemv_projections(model):
        yield


def with_generation_setup(fn):
    """Decorates ``fn(model, ...)`` to run inside ``generation_setup(model)``."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with generation_setup(model):
            return fn(model, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- sampling
def sample_logits(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax, or a sample after temperature, top-k and
    top-p (Hugging Face's order); no host synchronisation."""
    if not do_sample:
        return argmax_last(logits)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    # sample without torch.multinomial (no sync): argmax of p / Exp(1)
    q = torch.empty_like(probs).exponential_(1)
    return argmax_last(probs / q)


ARGMAX_CHUNK = 1024  # entries per program of the first pass of argmax_last
ARGMAX_SPLIT_MAX_ROWS = 64  # more rows: torch.argmax (H200, run aa: the two passes faster at 1-64 rows, 0.5-1.5x at 128-256)


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of x [B, V] in two passes: the maximum of each chunk of ARGMAX_CHUNK
    entries and its index, then the best chunk; the same index (the first maximum) as
    ``torch.argmax``. Compiled, ``torch.argmax`` over a vocabulary is one program per row, which
    reads the whole row alone: about 28 us per step for LLaMA-3's 128,256 entries at batch 1 on
    an H200 (docs/benchmarks/speed-h200-log.md, run w's profile), where the chunks run side by side
    (5.0 us, run aa). Beyond ARGMAX_SPLIT_MAX_ROWS rows, ``torch.argmax``."""
    B, V = x.shape
    n = V // ARGMAX_CHUNK
    if n < 2 or B > ARGMAX_SPLIT_MAX_ROWS:
        return x.argmax(-1)
    vals, idx = x[:, : n * ARGMAX_CHUNK].reshape(B, n, ARGMAX_CHUNK).max(-1)  # [B, n]: first maximum per chunk
    idx = idx + torch.arange(0, n * ARGMAX_CHUNK, ARGMAX_CHUNK, device=x.device)
    if V > n * ARGMAX_CHUNK:  # the entries after the last whole chunk
        tail_val, tail_idx = x[:, n * ARGMAX_CHUNK :].max(-1, keepdim=True)
        vals, idx = torch.cat([vals, tail_val], 1), torch.cat([idx, tail_idx + n * ARGMAX_CHUNK], 1)
    return idx.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1)  # the first chunk holding the maximum


# ----------------------------------------------------------------------------- model call
def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.2x; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _forward_logits(model, ids: torch.Tensor, pos: torch.Tensor, cache, cache_kw: str) -> torch.Tensor:
    """Logits of the last position [B, V] for ids [B, S] at positions pos [1, S]."""
    out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1]


def _decode_step(model, cache, cache_kw: str, tok, pos, do_sample: bool, temperature: float, top_k, top_p):
    """One token: tok [B, 1] at position pos [1, 1] -> next tokens [B, 1]."""
    logits = _forward_logits(model, tok, pos, cache, cache_kw)
    return sample_logits(logits, do_sample, temperature, top_k, top_p)[:, None]


_COMPILED: dict[tuple[str, bool], object] = {}  # (mode, launch_pdl) -> the compiled step


def compiled_decode_step(mode: str = "reduce-overhead", launch_pdl: bool = False):
    """The decode step compiled once per mode (dynamo caches one graph per model and shape);
    ``launch_pdl`` (mode "default" only): inductor's kernels launched with programmatic dependent
    launch (``cmoe.pdl``)."""
    key = (mode, launch_pdl)
    if key not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if launch_pdl:
            if mode != "default":
                raise ValueError(f"launch_pdl is for the step captured by decode_stepper (mode 'default'), not mode {mode!r}")
            _COMPILED[key] = torch.compile(_decode_step, options=pdl.inductor_options(), fullgraph=True)
        else:
            _COMPILED[key] = torch.compile(_decode_step, mode=mode, fullgraph=True)
    return _COMPILED[key]


def _device_state_only(cache) -> bool:
    """Whether every layer of ``cache`` keeps its state in device tensors (transformers'
    ``StaticLayer``: keys, values and the length), so that one captured step stays right at every
    position. Sliding-window layers also count their length in a Python int."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer).__name__ == "StaticLayer" and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        for layer in layers
    )


class _CapturedStep:
    """The compiled decode step of one (model, cache, batch, sampling) captured in a CUDA graph,
    with static inputs: a replay reads the tokens in ``tok`` at position ``pos``, writes the next
    tokens into ``tok`` and adds 1 to ``pos``."""

    def __init__(self, model, cache, cache_kw: str, batch: int, sampling: tuple, pool):
        device = cache.layers[0].keys.device  # the prefill has filled the cache
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        step = compiled_decode_step("default", launch_pdl=pdl.on(device))  # inductor, no CUDA graphs of its own
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        rng = torch.cuda.get_rng_state(device)  # sampling draws the same numbers whether or not this call captured
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile, and first calls, outside the capture
            for _ in range(2):
                step(model, cache, cache_kw, self.tok, self.pos, *sampling)
        torch.cuda.current_stream(device).wait_stream(side)
        for layer, n in zip(cache.layers, lengths):  # undo the warm-up's steps (their keys and
            layer.cumulative_length.copy_(n)  # values lie past the length, rewritten before use)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.tok.copy_(step(model, cache, cache_kw, self.tok, self.pos, *sampling))
            self.pos.add_(1)
        torch.cuda.set_rng_state(rng, device)


def decode_stepper(model, cache, cache_kw: str, tok: torch.Tensor, start: int, sampling: tuple, compile: bool):
    """The decode loop's step, after the prefill: a function of tokens [B, 1] (``tok``'s shape) at
    positions ``start``, ``start + 1``, ... at successive calls, returning the next tokens [B, 1].
    ``sampling``: (do_sample, temperature, top_k, top_p). Captured in a CUDA graph where ``compile``
    and the cache allow; the tensor it returns is then overwritten by the next call."""
    if compile and tok.is_cuda and _device_state_only(cache):
        weights = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
        if cache.__dict__.get("_cmoe_weights") != weights:  # first call, or weights replaced or moved since
            cache.__dict__.update(_cmoe_weights=weights, _cmoe_captured={})  # (the graphs read fixed addresses)
        graphs = cache.__dict__["_cmoe_captured"]  # dropped with the cache
        key = (tok.shape[0], sampling)
        if key not in graphs:
            pool = cache.__dict__.setdefault("_cmoe_pool", torch.cuda.graph_pool_handle())
            graphs[key] = _CapturedStep(model, cache, cache_kw, tok.shape[0], sampling, pool)
        g = graphs[key]
        g.pos.fill_(start)

        def replay(tok):
            if tok is not g.tok:
                g.tok.copy_(tok)
            g.graph.replay()
            return g.tok

        return replay
    fn = compiled_decode_step() if compile else _decode_step
    pos = torch.full((1, 1), start, dtype=torch.long, device=tok.device)

    def call(tok):
        nxt = fn(model, cache, cache_kw, tok.clone(), pos.clone(), *sampling)
        pos.add_(1)
        return nxt

    return call


_CACHES = "_cmoe_static_caches"  # on each model: {(batch, max_len): its StaticCache}, one at a time


def get_static_cache(model, batch_size: int, max_len: int):
    """A StaticCache for ``model``, reused (and reset) across calls of the same size so the
    compiled step keeps its graph."""
    if StaticCache is None:  # pragma: no cover
        raise RuntimeError("cmoe.generation needs transformers >= 5 (StaticCache)")
    store = model.__dict__.setdefault(_CACHES, {})
    key = (batch_size, max_len)
    if key not in store:
        store.clear()  # one cache at a time: KV caches are large
        store[key] = StaticCache(config=model.config, max_cache_len=max_len)
    else:
        store[key].reset()
    return store[key]


def drop_static_caches(model) -> None:
    """Forget ``model``'s static cache, and with it the decode steps captured over it (their CUDA
    graphs and memory pool): the next call builds and captures them again."""
    model.__dict__.pop(_CACHES, None)


# ----------------------------------------------------------------------------- public API
@torch.no_grad()
@with_generation_setup
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    compile: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_check_every: int = 16,
    max_len: int | None = None,
) -> torch.LongTensor:
    """Generate ``max_new_tokens`` tokens after ``input_ids [B, S]``; returns ``[B, S + n]``.

    ``compile``: compile the decode step with ``fullgraph=True`` and, on the GPU, capture it in a
    CUDA graph (``decode_stepper``; on the CPU plain inductor). With ``eos_token_id``, finished rows are
    filled with ``pad_token_id`` (default: the first eos id) and generation stops once every
    row has finished, checked every ``stop_check_every`` tokens (the only host syncs).
    ``max_len`` sizes the KV cache (default S + max_new_tokens); keep it fixed across calls to
    reuse the compiled graph.
    """
    B, S = input_ids.shape
    device = input_ids.device
    cache = get_static_cache(model, B, max_len or S + max_new_tokens)
    kw = _cache_kwarg(model)

    eos = None
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
        pad_token_id = int(eos[0]) if pad_token_id is None else pad_token_id

    out = torch.empty(B, S + max_new_tokens, dtype=torch.long, device=device)
    out[:, :S] = input_ids
    if max_new_tokens == 0:
        return out
    pos = torch.arange(S, device=device)[None]  # [1, S]
    logits = _forward_logits(model, input_ids, pos, cache, kw)
    tok = sample_logits(logits, do_sample, temperature, top_k, top_p)[:, None]  # [B, 1]
    done = torch.zeros(B, 1, dtype=torch.bool, device=device)
    step = decode_stepper(model, cache, kw, tok, S, (do_sample, temperature, top_k, top_p), compile)
    n = max_new_tokens
    for i in range(max_new_tokens):
        if eos is not None:
            tok = torch.where(done, pad_token_id, tok)
            done = done | torch.isin(tok, eos)
        out[:, S + i : S + i + 1] = tok
        if i == max_new_tokens - 1:
            break
        if eos is not None and (i + 1) % stop_check_every == 0 and bool(done.all()):
            n = i + 1
            break
        tok = step(tok)
    return out[:, : S + n]


@dataclass
class GenerationTiming:
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_s: float  # one prefill of batch_size x prompt_len
    decode_s: float  # per decode step (batch_size tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size / self.decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_len / self.prefill_s


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_time(fn, min_calls: int = 1, settle_s: float = 0.3, block_s: float = 0.5, device="cuda") -> float:
    """Mean seconds per call of ``fn()`` (work on ``device``) over one block of at least ``min_calls``
    calls lasting about ``block_s``, after calling it untimed, once or for ``settle_s``: its steady
    rate, which on a GPU under its power cap no longer depends on what ran before it. Timed by CUDA
    events on a GPU, by the host clock elsewhere."""
    device = torch.device(device)
    t0, n = time.perf_counter(), 0
    while n == 0 or time.perf_counter() - t0 < settle_s:
        fn()
        _sync(device)
        n += 1
    calls = max(min_calls, math.ceil(block_s * n / (time.perf_counter() - t0)))
    if device.type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(calls):
            fn()
        e1.record()
        torch.cuda.synchronize(device)
        return e0.elapsed_time(e1) / 1e3 / calls
    t1 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t1) / calls


@torch.no_grad()
@with_generation_setup
def time_generation(
    model,
    batch_size: int,
    prompt_len: int,
    new_tokens: int = 32,
    compile: bool = True,
    repeats: int = 3,
    vocab_size: int | None = None,
    seed: int = 0,
) -> GenerationTiming:
    """Median time of a prefill (``batch_size x prompt_len`` random tokens) and of one greedy
    decode step, measured over ``new_tokens`` steps after a warm-up run (compilation and CUDA
    graph capture excluded)."""
    device = next(model.parameters()).device
    V = vocab_size or model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, V, (batch_size, prompt_len), generator=g).to(device)
    max_len = prompt_len + new_tokens + 1
    kw = _cache_kwarg(model)
    pre, dec = [], []
    for r in range(repeats + 1):  # first round: warm-up and compile
        cache = get_static_cache(model, batch_size, max_len)
        pos = torch.arange(prompt_len, device=device)[None]
        _sync(device)
        t0 = time.perf_counter()
        tok = argmax_last(_forward_logits(model, ids, pos, cache, kw))[:, None]
        _sync(device)
        t1 = time.perf_counter()
        step = decode_stepper(model, cache, kw, tok, prompt_len, (False, 1.0, None, None), compile)
        _sync(device)
        t2 = time.perf_counter()  # after the first round's compilation and capture
        steps = new_tokens if r else 3
        for _ in range(steps):
            tok = step(tok)
        _sync(device)
        if r:
            pre.append(t1 - t0)
            dec.append((time.perf_counter() - t2) / steps)
    pre.sort()
    dec.sort()
    return GenerationTiming(batch_size, prompt_len, new_tokens, pre[len(pre) // 2], dec[len(dec) // 2])


def decode_passes(model, batch_size: int, prompt_len: int, steps: int, compile: bool = True, vocab_size: int | None = None,
                  seed: int = 0):
    """After one greedy prefill of ``batch_size x prompt_len`` random tokens: a function that runs
    one pass of ``steps`` greedy decode steps from the prompt's end, rewinding the static cache
    first (its layers' lengths put back), so that every pass writes and reads the same positions and
    returns the same tokens; it returns the last step's tokens [B, 1]. Run it inside
    ``generation_setup(model)``; the cache stays the model's (``drop_static_caches``)."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab_size or model.config.vocab_size, (batch_size, prompt_len), generator=g).to(device)
    cache = get_static_cache(model, batch_size, prompt_len + steps + 1)
    kw = _cache_kwarg(model)
    tok0 = argmax_last(_forward_logits(model, ids, torch.arange(prompt_len, device=device)[None], cache, kw))[:, None]
    lengths = [layer.cumulative_length.clone() for layer in cache.layers] if _device_state_only(cache) else None

    def one_pass() -> torch.Tensor:
        if lengths is not None:
            for layer, n in zip(cache.layers, lengths):
                layer.cumulative_length.copy_(n)
        step = decode_stepper(model, cache, kw, tok0, prompt_len, (False, 1.0, None, None), compile)  # at the prompt's end again
        tok = tok0
        for _ in range(steps):
            tok = step(tok)
        return tok

    return one_pass


@torch.no_grad()
@with_generation_setup
def time_decode(model, batch_size: int, prompt_len: int, steps: int = 32, compile: bool = True, min_passes: int = 1,
                settle_s: float = 0.3, block_s: float = 0.5, seed: int = 0) -> float:
    """Seconds per greedy decode step at ``batch_size`` after a random prompt of ``prompt_len``, at
    its steady rate: passes of ``steps`` steps over the same positions (``decode_passes``), the
    first (compilation, capture) untimed, then ``block_time`` of the passes (``settle_s`` of them
    untimed, then the mean over one block of at least ``min_passes`` lasting about ``block_s``). On
    a GPU under its power cap the step's time then no longer depends on what ran before it (an eager
    prefill of b x 512 tokens, another model's steps)."""
    one_pass = decode_passes(model, batch_size, prompt_len, steps, compile, seed=seed)
    device = next(model.parameters()).device
    one_pass()  # compiled and captured: kept out of block_time's estimate of the passes' rate
    _sync(device)
    return block_time(one_pass, min_passes, settle_s, block_s, device) / steps
