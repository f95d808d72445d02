"""Issue 5's recipes: fitted linear router, contribution partition, per-layer budget allocation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILY_TYPES, calib, tiny_model

import cmoe
from cmoe import allocation, checkpoint
from cmoe.config import RECIPES, CMoEConfig, ConfigError
from cmoe.routing import fit_linear_router, fit_ridge, topk_agreement
from cmoe.summary import param_summary


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def convert(model, name="S2A2E8", **kw):
    cfg = CMoEConfig.parse(name, calib_samples=4, calib_seqlen=32, **kw)
    return cmoe.convert_(model, cfg, calib(), device="cpu", progress=False)


def test_recipe_paper_is_the_previous_behaviour():
    """recipe="paper" resolves to the pre-recipe settings and gives the same model as spelling
    them out (markers, one k-means step, analytical router)."""
    cfg = CMoEConfig.parse("S2A2E8", recipe="paper")
    assert (cfg.features, cfg.kmeans_iters, cfg.router) == ("markers", 1, "analytical")
    a, b = tiny_model("llama"), tiny_model("llama")
    convert(a, "S2A2E8", recipe="paper")
    convert(b, "S2A2E8", recipe="plus", features="markers", kmeans_iters=1, router="analytical", refit="none")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # an old config.json (no recipe, kmeans_iters None = to convergence) still reads as the paper's
    old = CMoEConfig.from_dict({"shared": 2, "active": 2, "experts": 8, "kmeans_iters": None, "router": "analytical"})
    assert (old.recipe, old.kmeans_iters, old.features) == ("paper", 0, "markers")


def test_recipe_fields_can_be_overridden_and_are_validated():
    cfg = CMoEConfig.parse("S3A3E8", recipe="plus", router="analytical")
    assert cfg.router == "analytical" and cfg.features == RECIPES["plus"]["features"]
    for kw, match in [({"recipe": "nope"}, "unknown recipe"), ({"router": "nope"}, "unknown router"),
                      ({"features": "nope"}, "unknown features"), ({"budget": 1.5}, "budget"),
                      ({"kmeans_iters": -1}, "kmeans_iters")]:
        with pytest.raises(ConfigError, match=match):
            CMoEConfig.parse("S3A3E8", **kw)


def test_ridge_router_recovers_a_planted_linear_relation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g)
    w_true = torch.randn(6, 16, generator=g)
    y = x @ w_true.T
    torch.testing.assert_close(fit_ridge(x, y, ridge=0.0), w_true, rtol=1e-4, atol=1e-4)
    # the router fit: per-token centred targets; the planted ranking is reproduced exactly
    w = fit_linear_router(x, y + 5.0, ridge=1e-6)
    assert topk_agreement(x @ w.T, y, 2) == 1.0
    assert topk_agreement(-(x @ w_true.T), y, 2) < 0.5


@pytest.mark.parametrize("name", ["S2A6E8", "S0A4E4", "S1A3E4"])
@pytest.mark.parametrize("recipe, router", [("paper", "analytical"), ("paper", "linear"),
                                            ("plus", "analytical"), ("plus", "linear")])
def test_all_experts_active_equals_dense_for_every_router(name, recipe, router):
    model = tiny_model("llama")
    ids = calib(2, 16, seed=7)
    dense = logits(model, ids)
    report = convert(model, name, recipe=recipe, router=router)
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    for moe in cmoe.moe_layers(model):
        assert moe.spec.router == router
        idx, weight, p = moe.route(torch.randn(5, 64))
        assert weight.dtype == torch.float32 and torch.equal(weight, torch.ones_like(weight))
        assert sorted(moe.neuron_index.tolist()) == list(range(96))
    assert all(r.stats.router_agreement == 1.0 for r in report.layers)  # a = e - s: every expert chosen


@pytest.mark.parametrize("impl", ["loop", "gather", "grouped"])
def test_linear_router_works_with_every_expert_impl(impl):
    model = tiny_model("llama")
    convert(model, "S1A2E4", recipe="plus")
    ids = calib(1, 12, seed=5)
    ref = logits(model, ids)
    cmoe.set_expert_impl(model, impl)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_plus_partition_is_balanced_and_reports_cohesion_and_agreement():
    model = tiny_model("llama")
    report = convert(model, "S3A2E8", recipe="plus", allocation="uniform")
    for moe, r in zip(cmoe.moe_layers(model), report.layers):
        assert sorted(moe.neuron_index.tolist()) == list(range(96))
        assert moe.spec.shared_size == 36 and moe.experts.gate_up_proj.shape == (5, 24, 64)
        assert 0 < r.stats.cohesion <= 1 and 0 < r.stats.router_agreement <= 1
        assert r.stats.kmeans_iters >= 1


def test_allocation_meets_the_budget_exactly_and_respects_limits():
    g = torch.Generator().manual_seed(0)
    L, e = 7, 8
    costs = torch.rand(L, e + 1, generator=g).sort(dim=1, descending=True).values  # decreasing in k
    costs[:, e] = 0
    costs[2] *= 50  # a sensitive layer
    for budget in [0.25, 0.375, 0.5, 0.75]:
        cfg = CMoEConfig(experts=e, budget=budget, min_active=0.25, max_active=1.0)
        plan = allocation.allocate(costs, cfg)
        assert sum(a.units for a in plan) == budget * L * e
        assert all(2 <= a.units <= e and a.shared + a.active == a.units for a in plan)
        assert plan[2].units == max(a.units for a in plan)
        # exact optimum: brute force on a smaller problem agrees
    cfg = CMoEConfig(shared=1, active=1, experts=4, budget=0.5, min_active=0.25, max_active=0.75)
    small = costs[:3, [0, 2, 4, 6, 8]]
    plan = allocation.allocate(small, cfg)
    import itertools

    best = min((sum(small[l, k] for l, k in enumerate(ks)), ks)
               for ks in itertools.product(range(1, 4), repeat=3) if sum(ks) == 6)
    assert [a.units for a in plan] == list(best[1])
    with pytest.raises(ConfigError, match="not an integer"):
        allocation.allocate(costs, CMoEConfig(experts=e, budget=0.3))
    with pytest.raises(ConfigError, match="per-layer limits"):
        allocation.allocate(costs, CMoEConfig(experts=e, budget=0.25, min_active=0.5))


def test_budget_conversion_meets_the_budget_and_round_trips(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    ids = calib(2, 16, seed=7)
    report = convert(model, "S1A1E8", recipe="plus", budget=0.5)
    assert param_summary(model).ffn_active_fraction == 0.5
    assert report.sensitivity is not None and len(report.sensitivity) == 4
    specs = model.config.cmoe["layers"]
    assert len({(s["shared_size"], s["num_experts"], s["top_k"]) for s in specs}) > 1  # heterogeneous
    out = checkpoint.save(model, tmp_path / "ckpt")
    loaded = checkpoint.load(out)
    assert [m.spec for m in cmoe.moe_layers(loaded)] == [m.spec for m in cmoe.moe_layers(model)]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    rows = allocation.allocation_table(specs)
    assert sum(r["active"] for r in rows) / sum(r["total"] for r in rows) == 0.5
    png = allocation.plot_allocation(specs, str(tmp_path / "alloc.png"))
    assert (tmp_path / "alloc.png").stat().st_size > 1000 and png.endswith(".png")


def test_budget_one_keeps_every_layer_dense():
    model = tiny_model("llama")
    ids = calib(2, 16, seed=7)
    dense = logits(model, copy.deepcopy(ids))
    convert(model, "S1A1E8", recipe="plus", budget=1.0)
    assert all(m.spec.top_k == 0 and m.spec.shared_size == 96 for m in cmoe.moe_layers(model))
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_default_recipe_all_experts_active_equals_dense_every_family(model_type):
    assert CMoEConfig().recipe == "plus" and CMoEConfig().router == "linear"
    model = tiny_model(model_type)
    ids = calib(2, 16, seed=7)
    dense = logits(model, ids)
    convert(model, "S2A6E8")
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_allocation_setting_spreads_the_presets_fraction_and_is_validated():
    assert CMoEConfig.parse("S2A2E8", recipe="paper").allocation == "uniform"
    cfg = CMoEConfig.parse("S2A2E8", recipe="plus")
    assert cfg.allocation == "sensitivity" and cfg.active_fraction == 0.5 and cfg.budget is None
    assert CMoEConfig.parse("S2A2E8", recipe="paper", budget=0.25).allocation == "sensitivity"
    with pytest.raises(ConfigError, match="allocation='sensitivity'"):
        CMoEConfig.parse("S2A2E8", allocation="uniform", budget=0.5)
    with pytest.raises(ConfigError, match="unknown allocation"):
        CMoEConfig.parse("S2A2E8", allocation="nope")
    model = tiny_model("llama", num_hidden_layers=4)
    report = convert(model, "S2A2E8")  # the default recipe: (s + a) / e = 0.5 spread over the layers
    assert report.sensitivity is not None
    assert param_summary(model).ffn_active_fraction == 0.5
