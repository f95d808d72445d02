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
