"""cmoe.decode_attention against SDPA: one query position over a cache, grouped heads, masks.

Without a GPU the kernel runs in Triton's interpreter (``conftest.kernel_module``), on small shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_module, tiny_model

from cmoe import attention
from cmoe.generation import generate

da = kernel_module("decode_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def problem(B, H, HKV, L, D, dtype, seed=0, mask="none"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # [B, H, 1, D], strided as after q_proj's view
    k = torch.randn(B, HKV, L, D, generator=g)
    v = torch.randn(B, HKV, L, D, generator=g)
    m = None
    if mask == "holes":  # padding and an unfilled cache tail; every row keeps its last position
        m = torch.rand(B, 1, 1, L, generator=g) < 0.6
        m[..., L - 1] = True
    elif mask == "first":  # one visible key: every later slice of the cache is fully masked
        m = torch.zeros(B, 1, 1, L, dtype=torch.bool)
        m[..., 0] = True
    elif mask == "shared":  # one mask for every row, broadcast
        m = torch.arange(L).view(1, 1, 1, L) < max(1, L - 3)
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), (None if m is None else m.to(DEVICE))


def reference(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    out = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, scale=scale)  # [B, H, 1, D]
    return out.transpose(1, 2)  # [B, 1, H, D]


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,H,HKV,L,D,mask", [
    (1, 4, 4, 1, 16, "none"),  # one cached key
    (1, 4, 4, 200, 16, "holes"),  # multi-head, several slices merged
    (3, 6, 2, 131, 24, "holes"),  # grouped heads (3 per key/value head), head size not a power of 2
    (2, 8, 1, 300, 32, "first"),  # one key/value head; every slice but the first fully masked
    (2, 4, 2, 65, 16, "shared"),  # a mask broadcast over the batch; one key past a block
    (5, 2, 2, 9, 8, "none"),
    (1, 2, 1, 100, 160, "holes"),  # head size 160: padded to 256, blocks of 32 keys
])
def test_matches_sdpa(B, H, HKV, L, D, mask, dtype):
    q, k, v, m = problem(B, H, HKV, L, D, dtype, seed=B * 7 + L, mask=mask)
    scale = D ** -0.5 * (1.3 if mask == "holes" else 1.0)
    out = da.decode_attention(q, k, v, m, scale)
    assert out.dtype == dtype
    assert rel_err(out, reference(q, k, v, m, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_slice_and_many_slices_agree(dtype, monkeypatch):
    """The same attention with the cache in one slice per (row, head) (5 blocks of keys, rescaled
    as the running maximum grows) and in as many slices as fit, twice in a row: the merge tickets
    go back to 0 after each call."""
    q, k, v, m = problem(2, 4, 2, 300, 16, dtype, seed=5, mask="holes")
    ref = reference(q, k, v, m, 0.25)
    assert da._slices(4, 300, q.device)[0] > 1
    many = [da.decode_attention(q, k, v, m, 0.25) for _ in range(2)]
    assert not da._tickets(q.device).any()
    monkeypatch.setattr(da, "SPLIT_PROGRAMS_PER_SM", 0)
    assert da._slices(4, 300, q.device)[0] == 1
    one = da.decode_attention(q, k, v, m, 0.25)
    for out in (*many, one):
        assert rel_err(out, ref) < TOL[dtype]
    torch.testing.assert_close(many[0], many[1], atol=0, rtol=0)


def test_slices_cover_the_cache():
    cpu = torch.device("cpu")
    for rows_heads, L in ((1, 1), (1, 100_000), (2, 300), (8, 545), (15, 545), (16, 545), (2048, 545), (100_000, 100)):
        slices, per = da._slices(rows_heads, L, cpu)
        assert per % da.BLOCK_KEYS == 0 and (slices - 1) * per < L <= slices * per
        assert slices <= da.MAX_SLICES
        assert slices == 1 or (rows_heads < da.CPU_SMS and per >= da.MIN_BLOCKS_PER_SLICE * da.BLOCK_KEYS)
    assert da._slices(8, 545, cpu)[0] > 1 and da._slices(16, 545, cpu)[0] == 1


def test_serves_only_what_it_computes():
    q, k, v, m = problem(2, 4, 2, 10, 16, torch.float32, mask="holes")
    assert da.serves(q, k, v, m) and da.serves(q, k, v, None)
    assert not da.serves(torch.cat([q, q], 2), k, v, m)  # two query positions
    assert not da.serves(q, k, v, m.float())  # an additive mask
    assert not da.serves(q, k, v, m.expand(2, 4, 1, 10))  # a mask per head
    assert not da.serves(q[:, :3], k, v, m)  # 3 query heads over 2 key/value heads
    assert not da.serves(q, k, v[..., :8], m)  # value heads of another size


def test_fake_matches_the_op():
    q, k, v, m = problem(2, 4, 2, 10, 16, torch.float32, mask="holes")
    torch.library.opcheck(da.decode_attention, (q, k, v, m, 0.25), test_utils=("test_schema", "test_faketensor"))


def same_tokens_through(model, op: str, monkeypatch):
    """Greedy decoding of ``model`` without the decode kernels (transformers' attention) and with
    them (the CPU interpreter standing in for the GPU): the same tokens, and every decode step of
    every layer through ``da.<op>``, none without. Returns (the prompt, the list of calls, emptied),
    ``op`` still counted."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    calls = []
    real = getattr(da, op)

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(da, op, counted)
    monkeypatch.setattr(attention, "_on_gpu", lambda t: True)
    monkeypatch.setattr(attention, "DECODE_KERNEL", False)
    ref = generate(model, ids, 8, compile=False)
    assert not calls
    monkeypatch.setattr(attention, "DECODE_KERNEL", True)
    out = generate(model, ids, 8, compile=False)
    assert len(calls) == 7 * model.config.num_hidden_layers
    assert torch.equal(out, ref)
    calls.clear()
    return ids, calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_generation_through_the_kernel_matches_sdpa(family, monkeypatch):
    """Greedy decoding of tiny models with grouped heads (gemma3: sliding-window layers with their
    own cache size) gives the same tokens with the decode steps' attention in the kernel. A model
    on transformers' sdpa runs it while generating, and is back on sdpa after."""
    model = tiny_model(family, attn_implementation="sdpa").to(DEVICE)
    monkeypatch.setattr(attention, "DECODE_ROPE", False)  # LLaMA's rotary embedding outside the kernel
    ids, calls = same_tokens_through(model, "decode_attention", monkeypatch)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(input_ids=ids)  # outside generation: transformers' sdpa
    assert not calls


def test_only_models_on_sdpa_switch_and_they_switch_back():
    eager, sdpa = tiny_model("llama", attn_implementation="eager"), tiny_model("llama", attn_implementation="sdpa")
    with attention.decode_attention_on(eager), attention.decode_attention_on(sdpa):
        assert eager.config._attn_implementation == "eager"
        assert sdpa.config._attn_implementation == attention.NAME
    assert sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), attention.decode_attention_on(sdpa):
        raise RuntimeError
    assert sdpa.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- rotary and cache write folded in
def rotate(x, cos, sin):
    """transformers' LLaMA rotary embedding: x [B, h, 1, D], cos/sin [B or 1, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def rope_problem(B, H, HKV, L, D, pos, dtype, seed=0, rows_cos=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # strided as after the projections' views
    k = torch.randn(B, 1, HKV, D, generator=g).transpose(1, 2)
    v = torch.randn(B, 1, HKV, D, generator=g).transpose(1, 2)
    angle = torch.rand(rows_cos or B, 1, D // 2, generator=g) * 6.0
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    kc, vc = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    m = torch.arange(L).view(1, 1, 1, L).expand(B, 1, 1, L) <= pos  # causal: up to the new position
    m = m.clone()
    m[0, ..., 0] = False  # a hole (padding) in the first row
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return [cast(t) for t in (q, k, v, cos, sin, kc, vc)] + [torch.tensor(pos, device=DEVICE), m.to(DEVICE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,HKV,L,D,pos,rows_cos", [
    (1, 4, 4, 200, 16, 130, None),  # several slices; the new position inside a later one
    (3, 6, 2, 131, 32, 0, None),  # grouped heads; the first position (only the new key is visible)
    (2, 8, 1, 70, 32, 69, 1),  # the last position of the cache; one cos/sin row for every batch row
    (2, 4, 2, 9, 64, 5, None),
])
def test_rope_step_rotates_writes_the_cache_and_attends(B, H, HKV, L, D, pos, rows_cos, dtype):
    """``decode_attention_rope`` against transformers' order of work: q and k rotated, k and v
    written at ``pos`` of the caches, then attention over them; the caches come out as
    ``index_copy_`` leaves them, every other position untouched."""
    q, k, v, cos, sin, kc, vc, p, m = rope_problem(B, H, HKV, L, D, pos, dtype, rows_cos=rows_cos)
    qr = rotate(q.double(), cos.double(), sin.double())
    kr = rotate(k.double(), cos.double(), sin.double())
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref[:, :, pos] = kr[:, :, 0].to(dtype)
    vc_ref[:, :, pos] = v[:, :, 0]
    ref = reference(qr, kc_ref, vc_ref, m, 0.3)
    out = da.decode_attention_rope(q, k, v, cos, sin, kc, vc, p, m, 0.3)
    assert rel_err(out, ref) < TOL[dtype]
    torch.testing.assert_close(kc, kc_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(vc, vc_ref)
    others = torch.arange(L, device=DEVICE) != pos
    assert torch.equal(kc[:, :, others], kc_ref[:, :, others])


def test_rope_fake_matches_the_op():
    q, k, v, cos, sin, kc, vc, p, m = rope_problem(2, 4, 2, 10, 16, 3, torch.float32)
    torch.library.opcheck(da.decode_attention_rope, (q, k, v, cos, sin, kc, vc, p, m, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("causal_sdpa", [False, True], ids=["sdpa", "causal-sdpa"])
def test_llama_generation_with_the_rotary_embedding_in_the_kernel_matches_sdpa(monkeypatch, causal_sdpa):
    """Greedy decoding of a tiny LLaMA (grouped heads) gives the same tokens when every decode step
    of every layer runs ``decode_attention_rope`` (its own rotary embedding and cache write) as
    with transformers' rotary embedding, cache update and SDPA; also for a model already switched
    to ``cmoe_sdpa`` (``use_causal_sdpa``, as ``cmoe.bench`` builds them). The attentions get their
    own forward back afterwards, and the model its attention implementation."""
    model = tiny_model("llama", attn_implementation="sdpa").to(DEVICE)
    if causal_sdpa:
        attention.use_causal_sdpa(model)
    impl = model.config._attn_implementation
    same_tokens_through(model, "decode_attention_rope", monkeypatch)
    attn = model.model.layers[0].self_attn
    assert "forward" not in attn.__dict__ and model.config._attn_implementation == impl


def test_a_deep_copy_of_a_model_runs_its_own_attention_weights():
    """The folded forward is kept on each attention between entries; a deep copy of the model made
    after an entry computes with the copy's weights inside ``decode_attention_on``, not with the
    original's."""
    import copy

    model = tiny_model("llama", attn_implementation="sdpa")
    with attention.decode_attention_on(model):
        pass
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.weight.mul_(3)
        ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
        want = twin(input_ids=ids).logits
        with attention.decode_attention_on(twin):
            got = twin(input_ids=ids).logits
        original = model(input_ids=ids).logits
    assert not torch.allclose(want, original)
    torch.testing.assert_close(got, want)
