"""The speed table's accounting (cmoe.bench), on the CPU: the FFNs' share of a step's cost, the
model with its FFNs removed, and the table of where each cell's time goes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import calib, tiny_model

import cmoe
from cmoe import bench
from cmoe.config import CMoEConfig

CEIL = {"bandwidth_Bps": 4e12, "bf16_flops": 700e12}


def converted(name="S2A2E8"):
    model = tiny_model("llama")
    cfg = CMoEConfig.parse(name, calib_samples=4, calib_seqlen=32)
    cmoe.convert_(model, cfg, calib(), device="cpu", progress=False)
    return model


def test_no_ffn_model_is_the_model_with_zero_ffn_outputs():
    model = tiny_model("llama")
    ids = calib(2, 16)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in zeroed.model.layers:
            layer.mlp.down_proj.weight.zero_()
    bench.strip_ffn_(model)
    assert all(isinstance(layer.mlp, bench.NoFFN) for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed(ids).logits)


@pytest.mark.parametrize("kind", ["dense", "S2A2E8", "S1A1E8"])
def test_ffn_cost_is_what_step_cost_loses_without_the_ffns(kind):
    model = tiny_model("llama") if kind == "dense" else converted(kind)
    rest = tiny_model("llama")
    bench.strip_ffn_(rest)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    for batch, q_len, ctx, touched in [(1, 2048, 2048, None), (8, 1, 520, None), (1, 1, 520, [1] * L)]:
        full = bench.step_cost(model, batch, q_len, ctx, touched)
        ffn = bench.ffn_cost(model, batch, q_len, touched)
        other = bench.step_cost(rest, batch, q_len, ctx)
        assert full.bytes == ffn.bytes + other.bytes and full.flops == ffn.flops + other.flops
        assert bench.ffn_cost(rest, batch, q_len).bytes == 0
        if kind == "dense":
            f = model.config.intermediate_size
            assert ffn.bytes == L * 3 * d * f * 2 and ffn.flops == L * 2 * batch * q_len * 3 * d * f
    if kind != "dense":  # fewer touched experts, fewer bytes, the same FLOPs
        few, every = bench.ffn_cost(model, 1, 1, [1] * L), bench.ffn_cost(model, 1, 1, None)
        assert few.bytes < every.bytes and few.flops == every.flops


def row(config, seconds, ffn_bytes):
    cost = bench.Cost(bytes=ffn_bytes + 4e9, flops=1e9)  # 4 GB outside the FFNs
    return bench.Row("m", config, "decode", 1, 512, seconds, cost, ffn=bench.Cost(ffn_bytes, 1e9))


def rows_with_rest():
    """dense, the same model without FFNs, and S1A1E8, in one decode cell."""
    return [row("dense", 2.0e-3, 4e9), row(bench.NO_FFN, 1.2e-3, 0.0), row("S1A1E8", 1.6e-3, 1e9)]


def test_split_table_reports_the_rest_and_the_best_ratio():
    rows = rows_with_rest()
    bench.fill_ratios(rows, CEIL)
    assert rows[1].ratio is None  # the rest row is no cell of the speed table
    assert "no FFN" not in bench.table(rows, CEIL)
    moe = rows[2].__dict__
    assert moe["ratio"] == pytest.approx(2.0 / 1.6) and moe["limit"] == pytest.approx(8e9 / 5e9)
    lines = bench.split_table(rows, CEIL).splitlines()
    assert len(lines) == 4  # header, rule, dense, S1A1E8
    # S1A1E8: FFNs in context 1.6 - 1.2 ms; floor 1 GB at 4 TB/s = 250 us; best 2.0 / (1.2 + 0.25) ms
    best = 2.0 / 1.45
    assert lines[3] == (
        f"| m | S1A1E8 | decode b=1 | 1200.0 us | 400.0 us | 250.0 us | 0.62 | {best:.2f}x | "
        f"{100 * best / 1.6:.1f} % |"
    )
    assert lines[2].startswith("| m | dense | decode b=1 | 1200.0 us | 800.0 us | 1000.0 us | 1.25 |")


def test_split_table_is_empty_without_the_rest_rows():
    rows = [row("dense", 2.0e-3, 4e9), row("S1A1E8", 1.6e-3, 1e9)]
    bench.fill_ratios(rows, CEIL)
    assert bench.split_table(rows, CEIL) == ""


def test_report_writes_the_split_and_the_ffn_costs(tmp_path):
    rows = rows_with_rest()
    bench.report(rows, [], CEIL, "cpu", str(tmp_path))
    md = (tmp_path / "speed.md").read_text()
    assert "Where the time goes" in md and "| m | S1A1E8 | decode b=1 | 1200.0 us | 400.0 us |" in md
    saved = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["config"] for r in saved] == ["dense", "no FFN", "S1A1E8"]
    assert saved[2]["ffn"] == {"bytes": 1e9, "flops": 1e9} and saved[1]["ratio"] is None


def test_coordinate_descent_flag_sets_inductor_for_every_model_of_the_run(monkeypatch):
    """``--coordinate-descent``: every model of the run is built (and so compiled) under inductor's
    coordinate-descent tuning, and only then; the setting is put back after the run."""
    import torch._inductor.config as inductor_config

    class Built(Exception):
        pass

    seen = []

    def build(name, layers=None):
        seen.append(inductor_config.coordinate_descent_tuning)
        raise Built

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    monkeypatch.setattr(bench, "measure_ceilings", lambda: CEIL)
    monkeypatch.setattr(bench, "build_dense", build)
    before = inductor_config.coordinate_descent_tuning
    for flag, want in (([], before), (["--coordinate-descent"], True)):
        with pytest.raises(Built):
            bench.main(["--models", "llama2-7b", *flag])
        assert seen.pop() is want
        assert inductor_config.coordinate_descent_tuning is before
