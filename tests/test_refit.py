"""The closed-form down-projection refit (``cmoe.refit``, issue 5)."""

from __future__ import annotations

import copy

import pytest
import torch

from cmoe.carve import carve
from cmoe.config import CMoEConfig
from cmoe.families import FFNWeights
from cmoe.refit import down_weights, masked_activations, refit_down


def ffn(d=32, f=96, seed=0) -> tuple[FFNWeights, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = FFNWeights(torch.randn(f, d, generator=g) / d**0.5, torch.randn(f, d, generator=g) / d**0.5,
                   torch.randn(d, f, generator=g) / f**0.5, "silu")
    x = torch.randn(3000, d, generator=g)
    return w, x


def dense_out(w: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T


def rel_err(moe, w, x) -> float:
    y = dense_out(w, x)
    with torch.no_grad():
        return ((moe(x) - y).pow(2).sum() / y.pow(2).sum()).item()


@pytest.mark.parametrize("name", ["S2A2E8", "S0A1E4", "S1A1E8"])
def test_refit_lowers_the_error_and_reports_it_exactly(name):
    w, x = ffn()
    moe, _ = carve(w, x, CMoEConfig.parse(name, refit="none"))
    fitted = copy.deepcopy(moe)
    before, after = refit_down(fitted, x, ridge=1e-3)
    assert before == pytest.approx(rel_err(moe, w, x), rel=1e-4)
    assert after == pytest.approx(rel_err(fitted, w, x), rel=1e-3)
    assert after < before
    # only the down projections moved; the router and the gate/up rows are untouched
    for (k, a), (_, b) in zip(moe.state_dict().items(), fitted.state_dict().items()):
        if a.numel():
            assert torch.equal(a, b) == ("down" not in k), k


def test_refit_solves_the_least_squares_problem():
    """ridge 0: W + dW is the least-squares down projection of the masked activations."""
    w, x = ffn(seed=3)
    moe, _ = carve(w, x, CMoEConfig.parse("S2A2E8", refit="none"))
    h, hm = masked_activations(moe, x)
    y = h @ down_weights(moe).T
    refit_down(moe, x, ridge=0.0)
    expected = torch.linalg.lstsq(hm.double(), y.double()).solution.T.float()  # [d, f]
    torch.testing.assert_close(down_weights(moe), expected, rtol=1e-3, atol=1e-4)


def test_refit_changes_nothing_when_every_expert_is_active():
    w, x = ffn(seed=5)
    moe, _ = carve(w, x, CMoEConfig.parse("S2A6E8", refit="none"))
    before = copy.deepcopy(moe.state_dict())
    err_before, err_after = refit_down(moe, x)
    assert err_before == err_after == pytest.approx(0.0, abs=1e-10)
    for k, v in moe.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_carve_with_refit_reports_both_errors():
    w, x = ffn(seed=7)
    _, stats = carve(w, x, CMoEConfig.parse("S1A2E4", recipe="plus", refit="down"))
    assert 0 < stats.error < stats.error_before_refit
    _, stats = carve(w, x, CMoEConfig.parse("S1A2E4", recipe="plus", refit="none"))
    assert stats.error != stats.error  # nan: not measured without a refit


def test_layer_table_shows_the_refit_error_per_layer():
    from conftest import calib, tiny_model

    import cmoe
    from cmoe.summary import layer_table, render

    model = tiny_model("llama", num_hidden_layers=2)
    report = cmoe.convert_(model, CMoEConfig.parse("S1A2E4", calib_samples=4, calib_seqlen=32), calib(),
                           device="cpu", progress=False)
    text = render(layer_table(model, report.to_dict()))
    assert "output error (refit)" in text
    for r in report.layers:
        assert f"{r.stats.error_before_refit:.3f} -> {r.stats.error:.3f}" in text


def test_refit_toward_the_dense_output_is_the_plain_refit():
    """``toward`` equal to the dense FFN's output: the same target, the same down weights."""
    w, x = ffn(seed=9)
    moe, _ = carve(w, x, CMoEConfig.parse("S2A2E8", refit="none"))
    plain, pulled = copy.deepcopy(moe), copy.deepcopy(moe)
    refit_down(plain, x, ridge=1e-2)
    refit_down(pulled, x, ridge=1e-2, toward=dense_out(w, x), stream=1.0)
    torch.testing.assert_close(down_weights(pulled), down_weights(plain), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stream", [0.5, 1.0])
def test_refit_toward_a_shifted_target_fits_that_target(stream):
    """The target moves by ``stream`` toward ``toward``; the reported errors are against it."""
    w, x = ffn(seed=11)
    moe, _ = carve(w, x, CMoEConfig.parse("S2A2E8", refit="none"))
    y = dense_out(w, x)
    toward = y + 0.3 * y.std() * torch.randn(y.shape, generator=torch.Generator().manual_seed(0)) + 0.1 * y.roll(1, 1)
    target = y + stream * (toward - y)
    fitted = copy.deepcopy(moe)
    before, after = refit_down(fitted, x, ridge=1e-3, toward=toward, stream=stream)
    with torch.no_grad():
        err = lambda m: ((m(x) - target).pow(2).sum() / target.pow(2).sum()).item()  # noqa: E731
    assert before == pytest.approx(err(moe), rel=1e-4)
    assert after == pytest.approx(err(fitted), rel=1e-3)
    assert after < before


@pytest.mark.parametrize("stream", [-0.1, 1.5])
def test_refit_stream_must_be_a_fraction(stream):
    from cmoe.config import ConfigError

    with pytest.raises(ConfigError, match="refit_stream"):
        CMoEConfig.parse("S2A2E8", refit_stream=stream)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_stream_refit_keeps_the_all_active_model_dense(family):
    """Every expert active: the converted and dense streams coincide, so pulling the refit
    toward the dense stream changes nothing and the model still computes the dense function."""
    from conftest import calib, tiny_model

    import cmoe

    model = tiny_model(family, num_hidden_layers=2)
    ids = calib()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    cfg = CMoEConfig.parse("S1A3E4", calib_samples=4, calib_seqlen=32, refit_stream=1.0, allocation="uniform")
    cmoe.convert_(model, cfg, ids, device="cpu", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_stream_refit_changes_a_sparse_conversion():
    """A sparse layer with the stream target: the down weights differ from the plain refit's,
    and the first layer (no upstream error yet) differs only through its own error."""
    from conftest import calib, tiny_model

    import cmoe

    ids = calib()
    downs = {}
    for stream in (0.0, 1.0):
        model = tiny_model("llama", num_hidden_layers=2)
        cfg = CMoEConfig.parse("S1A1E4", calib_samples=4, calib_seqlen=32, refit_stream=stream, allocation="uniform")
        cmoe.convert_(model, cfg, ids, device="cpu", progress=False)
        downs[stream] = [down_weights(m) for m in cmoe.moe_layers(model)]
    torch.testing.assert_close(downs[0.0][0], downs[1.0][0], rtol=1e-4, atol=1e-5)  # layer 0: same inputs, same target
    assert not torch.allclose(downs[0.0][1], downs[1.0][1], rtol=1e-3, atol=1e-4)  # layer 1: corrects layer 0's error
