"""q/k/v as one GEMM (cmoe.fused_qkv): same logits, same parameters and state_dict, no copy."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_TYPES, calib, tiny_model
from torch import nn

import cmoe
from cmoe.config import CMoEConfig
from cmoe.fused_qkv import PROJ, fused_qkv
from cmoe.generation import generate


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def attentions(model):
    return [m for m in model.modules() if hasattr(m, "q_proj")]


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_fused_logits_match_eager_and_compiled(family):
    torch._dynamo.reset()
    model = tiny_model(family)
    ids = calib(2, 9, seed=3)
    ref = logits(model, ids)
    with torch.no_grad(), fused_qkv(model) as fused:
        eager = model(ids).logits
        compiled = torch.compile(lambda x: model(x).logits, fullgraph=True)(ids)
    expected = 0 if family == "phi3" else model.config.num_hidden_layers  # phi3 has one qkv_proj already
    assert len(fused) == expected
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=0)  # after: the modules are back
    assert all(type(getattr(a, p)) is nn.Linear for a in attentions(model) for p in PROJ)


def test_parameters_stay_the_same_objects_and_share_one_storage():
    model = tiny_model("qwen2")  # q/k/v with biases
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), fused_qkv(model):
        assert dict(model.named_parameters()) == params  # same names, same Parameter objects
        inside = model.state_dict()
        assert list(inside) == list(before)
        assert all(torch.equal(inside[k], v) for k, v in before.items())
    assert dict(model.named_parameters()) == params
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == n_bytes
    attn = attentions(model)[0]
    for kind in ("weight", "bias"):
        ts = [getattr(getattr(attn, p), kind) for p in PROJ]
        assert len({t.untyped_storage().data_ptr() for t in ts}) == 1  # one storage: no copy kept
        assert ts[1].data_ptr() == ts[0].data_ptr() + ts[0].numel() * ts[0].element_size()


def test_second_entry_reuses_the_stand_ins_and_rebuilds_after_a_move():
    model = tiny_model("llama")
    ids = calib(1, 5, seed=4)
    attn = attentions(model)[0]
    with torch.no_grad(), fused_qkv(model):
        first = attn.q_proj
    with torch.no_grad(), fused_qkv(model):
        assert attn.q_proj is first  # compiled code and captured graphs stay valid
        with fused_qkv(model) as inner:  # nested: already fused, nothing to do
            assert inner == []
        assert attn.q_proj is first
    model.to(torch.float64)  # new parameter storages: the old fused weight is stale
    ref = logits(model, ids)
    with torch.no_grad(), fused_qkv(model):
        assert attn.q_proj is not first and attn.q_proj.fused_w.dtype == torch.float64
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # in-place writes to a parameter reach the fused weight (a view)
        attn.k_proj.weight.mul_(2)
    ref2 = logits(model, ids)
    assert not torch.allclose(ref2, ref)
    with torch.no_grad(), fused_qkv(model):
        torch.testing.assert_close(model(ids).logits, ref2, rtol=1e-12, atol=1e-12)


def test_adapters_and_training_are_left_alone():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    with fused_qkv(model) as fused:  # grad enabled and weights that require grad
        assert fused == []
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad(), fused_qkv(peft_model) as fused:
        assert fused == []


def test_an_attention_that_feeds_k_another_input_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8, bias=False) for _ in range(3))

        def forward(self, x):
            return self.q_proj(x) + self.k_proj(x * 2) + self.v_proj(x)

    odd = Odd()
    with torch.no_grad(), fused_qkv(odd) as fused:
        assert fused == [odd]
        with pytest.raises(RuntimeError, match="k_proj was called on another input"):
            odd(torch.randn(3, 8))


def test_save_and_load_after_generation(tmp_path):
    model = tiny_model("llama")
    cmoe.convert_(model, CMoEConfig.parse("S1A1E4", calib_samples=2, calib_seqlen=32), calib(2, 32),
                  device="cpu", progress=False)
    ids = calib(2, 6, seed=7)
    out = generate(model, ids, 5, compile=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, do_sample=False))  # HF's loop: unfused
    loaded = cmoe.load(cmoe.save(model, tmp_path / "ckpt"))  # q/k/v now share a storage
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    assert torch.equal(generate(loaded, ids, 5, compile=False), out)


def test_inference_mode_leaves_normal_parameters_and_offloaded_layers_are_skipped():
    model = tiny_model("llama")
    ids = calib(1, 5, seed=8)
    with torch.inference_mode(), fused_qkv(model) as fused:
        assert len(fused) == 2
        model(ids)
    w = attentions(model)[0].q_proj.weight
    assert not w.is_inference()  # still usable for training
    w.requires_grad_(True)
    model(ids).logits.sum().backward()
    assert w.grad is not None
    offloaded = tiny_model("llama")
    offloaded.model.layers[0].self_attn.k_proj._hf_hook = object()  # as accelerate's device_map leaves it
    with torch.no_grad(), fused_qkv(offloaded) as fused:
        assert fused == [offloaded.model.layers[1].self_attn]
