"""Invariants of the conversion: they fail if the algorithm is wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILY_TYPES, calib, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import cmoe
from cmoe.analysis import CalibrationError, atopk_markers
from cmoe.config import CMoEConfig, ConfigError
from cmoe.families import family_of


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def convert(model, name="S2A2E8", **kw):
    kw.setdefault("recipe", "paper")  # these tests pin the paper's algorithm; tests/test_recipes.py covers the others
    cfg = CMoEConfig.parse(name, calib_samples=4, calib_seqlen=32, **kw)
    report = cmoe.convert_(model, cfg, calib(), device="cpu", progress=False)
    return report


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
@pytest.mark.parametrize("name", ["S2A6E8", "S8A0E8", "S0A4E4"])
def test_all_experts_active_equals_dense(model_type, name):
    """s + a = e: every neuron is used with weight 1, so the MoE is the dense FFN exactly."""
    model = tiny_model(model_type)
    ids = calib(2, 16, seed=7)
    dense = logits(model, ids)
    convert(model, name)
    assert all(isinstance(m, cmoe.CMoEMLP) for m in [getattr(l, "mlp") for l in family_of(model.config).layers(model)])
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_sparse_conversion_changes_output_and_runs_generate(model_type):
    model = tiny_model(model_type)
    ids = calib(1, 8, seed=3)
    dense = logits(model, ids)
    convert(model, "S1A1E4")
    sparse = logits(model, ids)
    assert not torch.allclose(sparse, dense, atol=1e-4)  # 50 % of neurons dropped per token
    model.generation_config.eos_token_id = None
    out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_generate_with_kv_cache_equals_uncached_greedy(model_type):
    model = tiny_model(model_type)
    convert(model, "S1A1E4")
    model.generation_config.eos_token_id = None
    ids = calib(1, 8, seed=3)
    gen = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # token 0 is the pad id: don't let generate mask it
        max_new_tokens=6,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    full = logits(model, gen.sequences)[0, ids.shape[1] - 1 : -1]  # no cache: one forward of everything
    torch.testing.assert_close(torch.cat(gen.logits), full, rtol=1e-4, atol=1e-4)


def test_partition_is_a_permutation_with_balanced_experts(llama):
    convert(llama, "S3A3E8")
    f = 96
    for moe in cmoe.moe_layers(llama):
        idx = moe.neuron_index.long()
        assert sorted(idx.tolist()) == list(range(f))  # every neuron in exactly one expert
        assert moe.spec.shared_size == 3 * f // 8
        assert moe.experts.gate_up_proj.shape == (5, 2 * f // 8, 64)
        assert moe.experts.down_proj.shape == (5, 64, f // 8)


def test_weights_are_the_dense_rows_of_their_neurons():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    convert(model, "S2A2E8")
    m = 96 // 8
    for layer, ref in zip(model.model.layers, dense.model.layers):
        moe = layer.mlp
        idx = moe.neuron_index.long()
        sh, routed = idx[: moe.spec.shared_size], idx[moe.spec.shared_size :].view(-1, m)
        g, u, d = ref.mlp.gate_proj.weight, ref.mlp.up_proj.weight, ref.mlp.down_proj.weight
        torch.testing.assert_close(moe.shared_gate_up.weight, torch.cat([g[sh], u[sh]]))
        torch.testing.assert_close(moe.shared_down.weight, d[:, sh])
        for e in range(routed.shape[0]):
            torch.testing.assert_close(moe.experts.gate_up_proj[e], torch.cat([g[routed[e]], u[routed[e]]]))
            torch.testing.assert_close(moe.experts.down_proj[e], d[:, routed[e]])


def test_shared_neurons_have_the_top_activation_rates_and_router_picks_top_a():
    model = tiny_model("llama")
    ffn_in = []
    h = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: ffn_in.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in calib():
            model(row[None])
    h.remove()
    x = torch.cat(ffn_in)
    w = family_of(model.config).read(model.model.layers[0].mlp, model.config)
    rates = atopk_markers(x, w, 10).rates
    convert(model, "S3A3E8")
    moe = model.model.layers[0].mlp
    shared = moe.neuron_index[: moe.spec.shared_size].long()
    others = moe.neuron_index[moe.spec.shared_size :].long()
    assert rates[shared].min() >= rates[others].max()
    # router: top-a of the analytical scores of the representative neurons, weights exactly 1
    idx, weight, p = moe.route(x)
    reps_g, reps_u = moe.router.gate, moe.router.up
    scores = ((x @ reps_u.T) * torch.nn.functional.silu(x @ reps_g.T)).abs()
    assert torch.equal(idx.sort(-1).values, scores.topk(3, dim=-1).indices.sort(-1).values)
    assert torch.equal(weight, torch.ones_like(weight))
    # the representatives' rows are normalised rows of member neurons
    for e in range(moe.spec.num_experts):
        members = moe.neuron_index[moe.spec.shared_size + e * 12 : moe.spec.shared_size + (e + 1) * 12].long()
        sims = torch.nn.functional.normalize(w.gate[members], dim=-1) @ moe.router.gate[e]
        assert torch.isclose(sims.max(), torch.tensor(1.0), atol=1e-5)


def test_deterministic_for_a_seed():
    a, b = tiny_model("llama"), tiny_model("llama")
    convert(a, "S2A2E8")
    convert(b, "S2A2E8")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_layer_l_plus_1_is_calibrated_on_converted_outputs(model_type):
    """Layer 1 is carved from the outputs of the already converted layer 0 (the pipeline
    adds the MoE's contribution to the layer's residual stream: check it against a real run)."""
    from cmoe.carve import carve

    cfg = CMoEConfig.parse("S1A1E8", calib_samples=4, calib_seqlen=32, recipe="paper")
    model = tiny_model(model_type)
    dense = copy.deepcopy(model)
    cmoe.convert_(model, cfg, calib(), device="cpu", progress=False)

    def layer1_inputs(layer0):
        m = copy.deepcopy(dense)
        m.model.layers[0].mlp = layer0
        xs = []
        m.model.layers[1].mlp.register_forward_pre_hook(lambda mod, a: xs.append(a[0].reshape(-1, 64)))
        with torch.no_grad():
            for row in calib():
                m(row[None])
        return torch.cat(xs)

    w1 = family_of(dense.config).read(dense.model.layers[1].mlp, dense.config)
    x_conv = layer1_inputs(model.model.layers[0].mlp)
    x_dense = layer1_inputs(dense.model.layers[0].mlp)
    assert not torch.allclose(x_conv, x_dense)
    moe, _ = carve(w1, x_conv, cfg)
    assert torch.equal(moe.neuron_index, model.model.layers[1].mlp.neuron_index)
    torch.testing.assert_close(moe.router.gate, model.model.layers[1].mlp.router.gate)


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("S2A2E7", {}, "does not divide"),
        ("S2A7E8", {}, "a=7"),
        ("S9A0E8", {}, "s=9"),
        ("S2A2E8", {"k_act": 97}, "k_act=97"),
    ],
)
def test_bad_settings_raise_before_any_change(name, kw, match):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        cfg = CMoEConfig.parse(name, **kw)
        cmoe.convert_(model, cfg, calib(), device="cpu", progress=False)
    assert not cmoe.moe_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_preset_and_calibration_shapes():
    with pytest.raises(ConfigError, match="S{s}A{a}E{e}"):
        CMoEConfig.parse("3-3-8")
    model = tiny_model("llama")
    cfg = CMoEConfig.parse("S2A2E8")
    with pytest.raises(ConfigError, match="calibration ids"):
        cmoe.convert_(model, cfg, torch.empty(0, 32, dtype=torch.long), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="calibration ids"):
        cmoe.convert_(model, cfg, torch.zeros(4, 1, dtype=torch.long), device="cpu", progress=False)
    assert not cmoe.moe_layers(model)


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(cmoe.UnsupportedModelError, match="gated FFN.*llama.*phi3"):
        cmoe.convert_(model, CMoEConfig(), calib(vocab=64), device="cpu", progress=False)


def test_nan_activations_are_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    ids = calib()
    ids[0, 3] = 5
    with pytest.raises(CalibrationError, match="NaN or inf"):
        cmoe.convert_(model, CMoEConfig.parse("S2A2E8"), ids, device="cpu", progress=False)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen3")
    convert(model, "S2A2E8")
    ids = calib(2, 16, seed=5)
    out = cmoe.save(model, tmp_path / "ckpt")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    loaded = cmoe.load(out)
    assert loaded.config.model_type == "cmoe_qwen3"
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    auto = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(auto, ids), logits(model, ids), rtol=0, atol=0)
    assert AutoConfig.from_pretrained(out).cmoe["config"]["shared"] == 2


def test_save_refuses_existing_checkpoint_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = tiny_model("llama")
    convert(model, "S2A2E8")
    out = cmoe.save(model, tmp_path / "ckpt")
    with pytest.raises(cmoe.CheckpointError, match="--overwrite"):
        cmoe.save(model, out)
    cmoe.save(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        cmoe.save(model, tmp_path / "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folder


def test_save_refuses_bad_folders_and_dense_models(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(cmoe.CheckpointError, match="not converted"):
        cmoe.save(model, tmp_path / "x")
    convert(model, "S2A2E8")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(cmoe.CheckpointError, match="not a folder"):
        cmoe.save(model, afile)
    with pytest.raises(cmoe.CheckpointError, match="cannot write"):
        cmoe.save(model, afile / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_save_load_round_trip_of_strided_weights(tmp_path):
    """Weights held as strided views (each layer's routed down projections and shared down weight
    transposed in memory) save and reload exactly, and the reloaded model, contiguous again, computes
    the logits of the model before its weights were made strided."""
    from cmoe.moe import moe_layers

    model = tiny_model("llama")
    convert(model, "S2A2E8")
    ids = calib(2, 16, seed=6)
    ref = logits(model, ids)
    for layer in moe_layers(model):
        for p in (layer.experts.down_proj, layer.shared_down.weight):
            p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not p.is_contiguous()
    loaded = cmoe.load(cmoe.save(model, tmp_path / "ckpt"))
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, model.state_dict()[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=0, atol=0)
