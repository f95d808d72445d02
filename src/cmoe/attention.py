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
  reduction (``DECODE_KERNEL``; docs/benchmarks/speed-h200.md, run z);
- inside ``decode_attention_on(model)``, the decode steps of LLaMA attentions with a static cache
  also rotate q and k and write k and v into the cache inside that launch
  (``decode_attention_rope``), instead of inductor's three kernels around it (``DECODE_ROPE``).

    from cmoe.attention import unpadded_prefill, use_causal_sdpa
    use_causal_sdpa(model)
    with unpadded_prefill():
        logits = compiled_forward(ids)      # traced here: SDPA's causal kernel
"""

from __future__ import annotations

import types
from contextlib import contextmanager

NAME = "cmoe_sdpa"
_UNPADDED = False  # inside unpadded_prefill()
DECODE_KERNEL = True  # decode steps on a GPU through cmoe.decode_attention
DECODE_ROPE = True  # ... with LLaMA's rotary embedding and the static cache's write in the same launch
_ROPE_STASH = "_cmoe_rope_forward"  # on each LLaMA attention: its folded forward, built once
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
    ``cmoe.decode_attention`` (its prefill, and any step on the CPU, run as on ``sdpa``), and the
    LLaMA attentions of a model on ``sdpa`` or ``NAME`` take ``rope_forward``; put back on exit.
    Models on any other attention are left as they are."""
    prev = model.config._attn_implementation
    if prev not in ("sdpa", NAME):
        yield
        return
    if prev == "sdpa":
        model.set_attn_implementation(register())
    folded = [m for m in model.modules() if _is_llama_attention(m)]
    for m in folded:
        m.forward = m.__dict__.setdefault(_ROPE_STASH, types.MethodType(rope_forward, m))
    try:
        yield
    finally:
        for m in folded:
            m.__dict__.pop("forward", None)
        if prev == "sdpa":
            model.set_attn_implementation(prev)


def _is_llama_attention(module) -> bool:
    """transformers' LLaMA attention, or a subclass that keeps its forward (the only one whose
    order of work ``rope_forward`` reproduces)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaAttention
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, LlamaAttention) and type(module).forward is LlamaAttention.forward


def _static_layer(cache, idx: int):
    """The cache's layer ``idx`` when it is transformers' full static layer, filled by the prefill
    and not offloaded, else None."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    if layers is None or getattr(cache, "offloading", False) or idx >= len(layers):
        return None
    layer = layers[idx]
    return layer if type(layer) is StaticLayer and getattr(layer, "is_initialized", False) else None


def rope_forward(module, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """The forward of a LLaMA attention (``module``), bound to it by ``decode_attention_on``: its
    decode steps on a GPU, over a static cache, run the rotary embedding, the cache write and the
    attention as one ``decode_attention_rope`` launch; every other call runs the class forward. A
    bound method, so that a deep copy of the module is bound to the copy."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    other = set(kwargs) - _DECODE_KWARGS - {"cache", "past_key_values"}
    layer = None
    if DECODE_ROPE and DECODE_KERNEL and not args and not other and not module.training and hidden_states.shape[1] == 1:
        layer = _static_layer(cache, module.layer_idx) if _on_gpu(hidden_states) and position_embeddings else None
    if layer is None or not _rope_serves(module, hidden_states, position_embeddings, attention_mask, layer):
        return type(module).forward(module, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    from .decode_attention import decode_attention_rope

    B, D = hidden_states.shape[0], module.head_dim
    q, k, v = (proj(hidden_states).view(B, 1, -1, D).transpose(1, 2) for proj in (module.q_proj, module.k_proj, module.v_proj))
    cos, sin = position_embeddings
    out = decode_attention_rope(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length,
                                attention_mask, module.scaling)
    layer.cumulative_length.add_(1)  # what StaticLayer.update does besides the write
    return module.o_proj(out.reshape(B, 1, -1)), None


def _rope_serves(module, hidden, position_embeddings, mask, layer) -> bool:
    """Whether ``decode_attention_rope`` computes this step: the cache's dtype and head size (a power
    of 2 from 16), whole groups of query heads per key/value head, cos/sin for one position, a boolean mask over the
    cache (or none)."""
    from .decode_attention import cache_serves, rope_head_size_ok

    cos, sin = position_embeddings
    keys, values = layer.keys, layer.values
    B, D, H = hidden.shape[0], module.head_dim, module.config.num_attention_heads
    dtype = module.q_proj.weight.dtype
    return (
        rope_head_size_ok(D) and keys.shape[0] == B
        and module.k_proj.weight.dtype == module.v_proj.weight.dtype == dtype
        and cache_serves(B, H, D, dtype, keys, values, mask)
        and cos.shape == sin.shape and cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1] == 1 and cos.shape[2] == D
    )


def use_causal_sdpa(model) -> None:
    """Switch a transformers model from ``sdpa`` to ``NAME``."""
    if model.config._attn_implementation != "sdpa":
        raise ValueError(f"use_causal_sdpa expects a model using 'sdpa' attention, not {model.config._attn_implementation!r}")
    model.set_attn_implementation(register())
