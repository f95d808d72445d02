"""cmoe_sdpa: transformers' SDPA attention, with the causal mask left to SDPA under compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from cmoe.attention import NAME, unpadded_prefill, use_causal_sdpa
from cmoe.generation import generate


def _tiny(attn="sdpa"):
    return tiny_model("llama", attn_implementation=attn)


def _sdpa_calls(fn) -> list[dict]:
    """Compile ``fn`` and return the keyword arguments of every SDPA call in its graph."""
    calls = []

    def backend(gm, example_inputs):
        calls.extend(dict(n.kwargs) for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)()
    return calls


def _forward(model, ids):
    return lambda: model(input_ids=ids, use_cache=False).logits


def test_compiled_prefill_uses_is_causal_only_under_the_promise():
    model = _tiny()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        before = _sdpa_calls(_forward(model, ids))
        use_causal_sdpa(model)
        assert model.config._attn_implementation == NAME
        unpromised = _sdpa_calls(_forward(model, ids))
        with unpadded_prefill():
            promised = _sdpa_calls(_forward(model, ids))
            torch._dynamo.reset()
            out = torch.compile(_forward(model, ids), fullgraph=True)()
    assert len(promised) == 2 and all(c["is_causal"] and c["attn_mask"] is None for c in promised)
    assert len(unpromised) == 2 and all(c["attn_mask"] is not None for c in unpromised)
    if torch.__version__ < "2.14":  # what cmoe_sdpa is for: transformers' sdpa builds the mask when traced
        assert all(c["attn_mask"] is not None for c in before)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padded_batches_keep_their_mask_outside_the_promise():
    model = _tiny()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is left-padded
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        use_causal_sdpa(model)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_generation_with_a_static_cache_is_unchanged():
    model = _tiny()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = generate(model, ids, 10, compile=False)
    use_causal_sdpa(model)
    assert torch.equal(generate(model, ids, 10, compile=False), ref)
    with unpadded_prefill():  # cached keys: the decode steps keep their mask
        assert torch.equal(generate(model, ids, 10, compile=False), ref)


def test_other_attention_implementations_are_refused():
    with pytest.raises(ValueError, match="expects a model using 'sdpa'"):
        use_causal_sdpa(_tiny("eager"))
