"""The compiled-generation path (static cache, sampling in the step) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import calib
from transformers import LlamaConfig, LlamaForCausalLM

from cmoe import generation
from cmoe.generation import ARGMAX_CHUNK, argmax_last, generate, sample_logits, time_generation


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def test_greedy_matches_hf_generate(tiny):
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    ref = tiny.generate(ids, max_new_tokens=12, do_sample=False)
    out = generate(tiny, ids, 12, compile=False)
    assert out.shape == (3, 19)
    assert torch.equal(out, ref)
    # a second call reuses (and resets) the static cache
    assert torch.equal(generate(tiny, ids, 12, compile=False), ref)


def test_eos_stops_and_pads_like_hf(tiny):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    free = generate(tiny, ids, 20, compile=False)
    eos = int(free[0, 8])  # a token row 0 produces
    ref = tiny.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = generate(tiny, ids, 20, compile=False, eos_token_id=eos, pad_token_id=0, stop_check_every=2)
    n = min(out.shape[1], ref.shape[1])
    assert torch.equal(out[:, :n], ref[:, :n])
    assert out.shape[1] <= 25


def test_sampling_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    k2 = sample_logits(logits, True, top_k=2)
    assert set(k2.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # top_p just above p0 keeps tokens 0 and 1
    tp = sample_logits(logits, True, top_p=float(p[0]) + 1e-3)
    assert set(tp.tolist()) == {0, 1}
    freq0 = (sample_logits(logits, True, temperature=1.0) == 0).float().mean()
    assert abs(freq0 - p[0]) < 0.05  # the exponential-race sampler draws from softmax
    assert torch.equal(sample_logits(logits, False), torch.zeros(2000, dtype=torch.long))


@pytest.mark.parametrize("V", [ARGMAX_CHUNK - 1, 2 * ARGMAX_CHUNK, 5 * ARGMAX_CHUNK + 7, 32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_last_is_torch_argmax(V, dtype):
    g = torch.Generator().manual_seed(V)
    B = 5
    x = torch.randn(B, V, generator=g).to(dtype)
    x[1] = torch.randint(0, 4, (V,), generator=g).to(dtype)  # many ties: the first maximum wins
    x[2] = 0
    x[2, [V - 1, V // 2]] = 7  # two maxima in different chunks (the last entry in the tail)
    x[3, -1] = 100  # the maximum in the tail
    x[4, ARGMAX_CHUNK - 1 : ARGMAX_CHUNK + 1] = 100  # tied across a chunk boundary
    want = x.argmax(-1)
    assert torch.equal(argmax_last(x), want)
    assert torch.equal(torch.compile(argmax_last, fullgraph=True)(x), want)
    assert torch.equal(argmax_last(x[:1]), want[:1])


def test_sampled_generation_runs(tiny):
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(3))
    out = generate(tiny, ids, 6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, compile=False)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], ids)
    assert ((out >= 0) & (out < 128)).all()


def test_time_generation(tiny):
    t = time_generation(tiny, batch_size=2, prompt_len=8, new_tokens=3, compile=False, repeats=1)
    assert t.prefill_s > 0 and t.decode_s > 0 and t.decode_tokens_per_s > 0


def test_block_time_settles_then_times_one_block(monkeypatch):
    """``block_time``: untimed calls for ``settle_s`` (at least one), then one timed block of
    enough calls to last about ``block_s`` (at least ``min_calls``), its mean per call: by CUDA
    events on a GPU, by the host clock elsewhere."""
    clock = {"t": 0.0, "calls": 0}

    def fn():  # each call "takes" 1/64 s (exact in binary)
        clock["t"] += 1 / 64
        clock["calls"] += 1

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = clock["t"]

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3

    monkeypatch.setattr(generation.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    assert generation.block_time(fn, min_calls=5, settle_s=0.125, block_s=0.5) == 1 / 64
    assert clock["calls"] == 8 + 32  # 1/8 s settling, then 1/2 s of calls
    clock["calls"] = 0
    assert generation.block_time(fn, min_calls=5, settle_s=0.0, block_s=0.0) == 1 / 64
    assert clock["calls"] == 1 + 5
    clock["calls"] = 0  # elsewhere the same by the host clock
    assert generation.block_time(fn, min_calls=5, settle_s=0.125, block_s=0.5, device="cpu") == 1 / 64
    assert clock["calls"] == 8 + 32


def test_decode_passes_rewind_to_the_prompts_end(tiny):
    """Every pass of ``decode_passes`` decodes the same tokens from the prompt's end: the tokens
    greedy generation gives after the same prompt."""
    steps = 5
    with generation.generation_setup(tiny), torch.no_grad():
        one_pass = generation.decode_passes(tiny, 2, 8, steps, compile=False, seed=3)
        last = [one_pass() for _ in range(3)]
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    ref = generate(tiny, ids, steps + 1, compile=False)
    assert all(torch.equal(t, ref[:, -1:]) for t in last)
    generation.drop_static_caches(tiny)


def test_time_decode_times_a_block_of_passes(tiny, monkeypatch):
    """Passes: one warm-up, then settling, then a block of at least ``min_passes``; the result is
    the block's time per step."""
    calls = []
    real = generation.decode_passes

    def counting(*a, **k):
        one_pass = real(*a, **k)

        def counted():
            calls.append(1)
            return one_pass()
        return counted

    monkeypatch.setattr(generation, "decode_passes", counting)
    t = generation.time_decode(tiny, 1, 8, steps=2, compile=False, min_passes=4, settle_s=0.0, block_s=0.0)
    assert t > 0 and len(calls) == 1 + 1 + 4
    generation.drop_static_caches(tiny)


def test_compiled_generation_of_a_converted_model_matches_eager(tiny):
    """A batch of 5 (beyond the CPU's select path): the traced step takes a path torch.compile
    can trace in float32 (``dense``), with the same tokens as eager generation."""
    import copy

    from cmoe import CMoEConfig, convert_

    model = copy.deepcopy(tiny)
    convert_(model, CMoEConfig.parse("S1A1E4", calib_samples=2, calib_seqlen=32, allocation="uniform"),
             calib(2, 32, seed=4), device="cpu", progress=False)
    ids = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    assert torch.equal(generate(model, ids, 4, compile=True), generate(model, ids, 4, compile=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the captured decode step needs a GPU")
def test_captured_decode_step_matches_eager_on_the_gpu(tiny):
    """On the GPU the compiled step is captured once in a CUDA graph that feeds its tokens back:
    the same tokens as eager decoding, for a dense and a converted model, the graph reused by the
    next call of the same size; sampling inside the graph repeats under the same seed."""
    import copy

    from cmoe import CMoEConfig, convert_

    converted = copy.deepcopy(tiny)
    convert_(converted, CMoEConfig.parse("S1A1E4", calib_samples=2, calib_seqlen=32, allocation="uniform"),
             calib(2, 32, seed=4), device="cpu", progress=False)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(5)).cuda()
    for model in (copy.deepcopy(tiny).cuda(), converted.cuda()):
        torch._dynamo.reset()
        eager = generate(model, ids, 9, compile=False)
        assert torch.equal(eager, model.generate(ids, max_new_tokens=9, do_sample=False))  # HF's loop, q/k/v unfused
        assert torch.equal(generate(model, ids, 9, compile=True), eager)
        (cache,) = model.__dict__[generation._CACHES].values()
        assert len(cache.__dict__["_cmoe_captured"]) == 1
        assert torch.equal(generate(model, ids, 9, compile=True), eager)  # replays the same graph
        assert len(cache.__dict__["_cmoe_captured"]) == 1
        sampled = []
        for _ in range(2):
            torch.manual_seed(7)
            sampled.append(generate(model, ids, 9, do_sample=True, temperature=0.8, top_k=20))
        assert torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[0][:, :6], ids)
        assert ((sampled[0] >= 0) & (sampled[0] < 128)).all()
        stop = int(eager[0, 8])  # eos: the rows that produce it are padded after it, as in eager decoding
        assert torch.equal(generate(model, ids, 9, eos_token_id=stop, pad_token_id=0),
                           generate(model, ids, 9, eos_token_id=stop, pad_token_id=0, compile=False))
        before = cache.__dict__["_cmoe_captured"]
        with torch.no_grad():  # a weight replaced (new memory): the graph is captured again, on the new weights
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight * -1.0)
        assert torch.equal(generate(model, ids, 9, compile=True), generate(model, ids, 9, compile=False))
        assert cache.__dict__["_cmoe_captured"] is not before
