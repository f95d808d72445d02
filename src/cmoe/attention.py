"""SDPA attention that can run as SDPA's causal kernel when traced (compile, CUDA-graph capture).

transformers' ``sdpa`` attention leaves the causal mask to SDPA's ``is_causal`` flag (its flash
kernel, which skips the masked half) only when it can read the inputs: not while tracing with
torch.compile, nor while capturing a CUDA graph, and not without a cache when the position ids
might describe packed sequences. There it builds the whole [q, kv] boolean mask: one more kernel,
and an attention kernel that also computes the masked half (on an H200 at 2,048 tokens,
``cudnn`` with the mask took about 0.21 ms per layer of a LLaMA-2-7B shape).

``NAME`` is transformers' ``sdpa`` with two additions:

- inside ``unpadded_prefill()``, where the caller promises that every sequence starts at position 0
  with no padding and no packing, an attention over as many keys as queries (a prefill without
  cached keys) drops the mask and uses ``is_causal``. Outside it, nothing changes;
- on a GPU, one query position over cached keys (a decode step) runs ``cmoe.decode_attention``:
  one Triton launch that reads grouped key/value heads in place, where SDPA under torch.compile
  takes a copy of the cache per query head (``repeat_kv``), a mask conversion and a separate
  reduction (``DECODE_KERNEL``; docs/benchmarks/speed-h200.md, run z).

    from cmoe.attention import unpadded_prefill, use_causal_sdpa
    use_causal_sdpa(model)
    with unpadded_prefill():
        logits = compiled_forward(ids)      # traced here: SDPA's causal kernel
"""

from __future__ import annotations

from contextlib import contextmanager

NAME = "cmoe_sdpa"
_UNPADDED = False  # inside unpadded_prefill()
DECODE_KERNEL = True  # decode steps on a GPU through cmoe.decode_attention
# keyword arguments of transformers' attention calls that decode_attention serves as given (the
# sliding window lives in the mask); any other one sends the call to SDPA
_DECODE_KWARGS = {"dropout", "scaling", "sliding_window", "position_ids", "cache_position", "use_cache",
                  "output_attentions", "softcap", "position_bias", "is_causal"}


@contextmanager
def unpadded_prefill():
    """Promise, for the forwards run or traced inside: one unpadded, unpacked sequence per row,
    from position 0."""
    global _UNPADDED
    prev, _UNPADDED = _UNPADDED, True
    try:
        yield
    finally:
        _UNPADDED = prev


def causal_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa_attention_forward``; under the promise, a square attention (no cached
    keys) goes to SDPA's causal kernel instead of the materialised mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _decode_kernel_serves(query, key, value, attention_mask, kwargs):
        from . import decode_attention

        scaling = kwargs.get("scaling")
        return decode_attention.decode_attention(query, key, value, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling), None
    if _UNPADDED and attention_mask is not None and query.shape[2] == key.shape[2] > 1 and getattr(module, "is_causal", True):
        attention_mask = None  # sdpa_attention_forward then sets is_causal
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _on_gpu(t) -> bool:
    return t.is_cuda


def _decode_kernel_serves(query, key, value, attention_mask, kwargs) -> bool:
    """A decode step on a GPU that ``cmoe.decode_attention`` computes exactly as SDPA would: no
    dropout, soft-capping, position bias or attention weights asked for, no other argument."""
    if not (DECODE_KERNEL and _on_gpu(query) and query.shape[2] == 1):
        return False
    if set(kwargs) - _DECODE_KWARGS or kwargs.get("dropout") or kwargs.get("output_attentions"):
        return False
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    from .decode_attention import serves

    return serves(query, key, value, attention_mask)


def register() -> str:
    """Register ``NAME`` with transformers (this attention function, transformers' SDPA masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, causal_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@contextmanager
def decode_attention_on(model):
    """Inside, a model on transformers' ``sdpa`` runs ``NAME``, whose decode steps on a GPU take
    ``cmoe.decode_attention`` (its prefill, and any step on the CPU, run as on ``sdpa``); put back
    on exit. Models on any other attention are left as they are."""
    prev = model.config._attn_implementation
    if prev != "sdpa":
        yield
        return
    model.set_attn_implementation(register())
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


def use_causal_sdpa(model) -> None:
    """Switch a transformers model from ``sdpa`` to ``NAME``."""
    if model.config._attn_implementation != "sdpa":
        raise ValueError(f"use_causal_sdpa expects a model using 'sdpa' attention, not {model.config._attn_implementation!r}")
    model.set_attn_implementation(register())
