"""Each CMoE layer's shared and routed weights in one gate/up and one down matrix, for generation.

A ``CMoEMLP`` keeps its shared expert (``shared_gate_up [2ms, d]``, ``shared_down [d, ms]``) and its
routed experts (``experts.gate_up_proj [E, 2m, d]``, ``experts.down_proj [E, d, m]``) in four
tensors. Where the routing touches every expert (decode at 128-256 tokens), the dense path
multiplies every neuron anyway, and with four tensors that takes four GEMMs, a batched one whose
[E, T, d] rows are then summed. ``pack_model_(model)`` moves each layer's weights into

- ``G [2ms + 2Em, d]``: the shared gate/up rows, then each expert's (the parameters' own order), and
- ``D [d, ms + Em]``: each output row holds the shared expert's ms columns, then expert 0's m, ...,

and leaves the four parameters as views of them (the same ``Parameter`` objects, names and shapes;
``shared_down`` and ``down_proj`` become views with a row stride of ms + Em). The dense path then
runs the dense FFN's two GEMMs, ``x @ G.T`` and ``h @ D.T``, with the routing applied to h
(``cmoe.triton_experts.triton_dense_op``). Every other path reads the views as they are.

As with ``cmoe.fused_qkv``, no weight is copied twice: one layer at a time, so the peak extra
memory is one layer's FFN. With ``PACK = True``, generation packs the model on a GPU and leaves it
packed, so compiled code and captured CUDA graphs stay valid (with ``PACK = False`` it unpacks a
packed one). Only layers on a GPU with plain weights (no adapter, no parametrization) are packed.
``cmoe.save`` writes a packed model's weights as the usual separate tensors.

Off by default until measured on every cell: on the H200 (llama3-8b shapes, 4 layers, run ae in
docs/benchmarks/speed-h200.md) packing took decode at batch 256 from 0.978x / 0.982x of dense to
1.003x / 0.995x (S3A3E8 / S2A2E8), and at batch 128, where the dense path also runs, from 1.018x /
1.013x to 0.981x / 0.985x; the dense path now multiplies packed weights only from 256 tokens
(``cmoe.triton_experts.PACKED_MIN_TOKENS``), which is not measured yet, nor is llama2-7b packed.

    cmoe.packed_ffn.PACK = True  # generation then packs (cmoe.generation.generation_setup)
    python benchmarks/bench_speed.py --pack ...  # the speed table with packed layers
"""

from __future__ import annotations

import torch
from torch import nn

PACK = False  # True: generation packs every CMoE layer on a GPU (False: unpacks packed ones)


def _params(layer) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
    """(shared gate/up, routed gate/up, shared down, routed down) of a ``CMoEMLP``."""
    return layer.shared_gate_up.weight, layer.experts.gate_up_proj, layer.shared_down.weight, layer.experts.down_proj


def packed_views(gate_up, down, shared_gate_up=None, shared_down=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(G [2ms + 2Em, d], D [d, ms + Em]) when a layer's weights (as ``cmoe.triton_experts.layer_args``
    gives them; the shared ones None without a shared expert) lie packed, else None."""
    E, d, m = down.shape
    ms = 0 if shared_down is None else shared_down.shape[1]
    n = ms + E * m
    if not (gate_up.is_contiguous() and down.stride() == (m, n, 1)):
        return None
    G, D = gate_up.reshape(E * 2 * m, d), down.as_strided((d, E * m), (n, 1))
    if ms:
        el = down.element_size()
        if not (
            shared_gate_up.is_contiguous() and shared_down.stride() == (n, 1)
            and gate_up.data_ptr() == shared_gate_up.data_ptr() + 2 * ms * d * el
            and down.data_ptr() == shared_down.data_ptr() + ms * el
            and gate_up.untyped_storage().data_ptr() == shared_gate_up.untyped_storage().data_ptr()
            and down.untyped_storage().data_ptr() == shared_down.untyped_storage().data_ptr()
        ):
            return None
        G, D = shared_gate_up.as_strided((2 * ms + 2 * E * m, d), (d, 1)), shared_down.as_strided((d, n), (n, 1))
    return G, D


def _packable(layer) -> bool:
    """On a GPU, plain ``nn.Linear`` shared weights, no parametrization (peft), nothing training."""
    from torch.nn.utils import parametrize

    mods = (layer.shared_gate_up, layer.shared_down, layer.experts)
    return (
        type(layer.shared_gate_up) is nn.Linear and type(layer.shared_down) is nn.Linear
        and not any(parametrize.is_parametrized(mod) for mod in mods)
        and layer.experts.down_proj.is_cuda
        and not any(p.requires_grad and torch.is_grad_enabled() for p in _params(layer))
    )


def is_packed(layer) -> bool:
    """Whether a ``CMoEMLP``'s four FFN weights lie packed (``packed_views``)."""
    sgu, gu, sd, dn = _params(layer)
    ms = layer.spec.shared_size
    return packed_views(gu, dn, sgu if ms else None, sd if ms else None) is not None


def pack(shared_gate_up, gate_up, shared_down, down) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four weights (shared ones [0, d] and [d, 0] without a shared expert) copied into one
    gate/up and one down storage: views of them, in the same order and shapes."""
    E, d, m = down.shape
    ms = shared_down.shape[1]
    with torch.no_grad(), torch.inference_mode(False):  # normal tensors even under inference_mode
        G = torch.cat([shared_gate_up, gate_up.reshape(E * 2 * m, d)])
        D = torch.cat([shared_down, down.permute(1, 0, 2).reshape(d, E * m)], dim=1)
    return G[: 2 * ms], G[2 * ms :].view(E, 2 * m, d), D[:, :ms], D[:, ms:].view(d, E, m).permute(1, 0, 2)


def pack_(layer) -> None:
    """Move one layer's FFN weights into the packed storage (see the module's docstring)."""
    params = _params(layer)
    for p, view in zip(params, pack(*(p.data for p in params))):
        p.data = view


def unpack_(layer) -> None:
    """Give each of a layer's four FFN weights a contiguous storage of its own again."""
    for p in _params(layer):
        with torch.no_grad(), torch.inference_mode(False):
            p.data = p.data.clone(memory_format=torch.contiguous_format)


def pack_model_(model: nn.Module, on: bool = True) -> int:
    """Pack (``on``) every CMoE layer of ``model`` on a GPU with plain weights, or unpack every packed
    one; returns how many layers changed."""
    from .moe import moe_layers

    changed = 0
    for layer in moe_layers(model):
        if on and _packable(layer) and not is_packed(layer):
            pack_(layer)
            changed += 1
        elif not on and is_packed(layer):
            unpack_(layer)
            changed += 1
    if changed:  # compiled code checks the weights' strides only with an assertion: compile again
        torch.compiler.reset()
    return changed

