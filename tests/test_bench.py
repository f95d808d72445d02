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


def test_interleaved_alternates_the_order_every_round():
    calls = []

    def timer(name):
        def run():
            calls.append(name)
            return float(len(calls))
        return run

    out = bench.interleaved({"dense": timer("dense"), "moe": timer("moe")}, rounds=3)
    assert calls == ["dense", "moe", "moe", "dense", "dense", "moe"]
    assert out == {"dense": [1.0, 4.0, 5.0], "moe": [2.0, 3.0, 6.0]}


def test_ratio_is_the_median_of_the_rounds_ratios():
    """Timed alternately, a converted row's ratio is the median of dense/moe per round (not the
    ratio of the medians), with its range; the table prints both."""
    dense = row("dense", 2.0e-3, 4e9)
    moe = row("S1A1E8", 1.6e-3, 1e9)
    moe.extra = {"rounds": [1.0e-3, 1.6e-3, 2.0e-3], "dense_rounds": [1.9e-3, 2.0e-3, 3.0e-3]}
    bench.fill_ratios([dense, moe], CEIL)
    assert moe.ratio == pytest.approx(1.5) and moe.extra["ratio_range"] == pytest.approx((1.25, 1.9))
    assert dense.ratio == 1.0
    line = bench.table([dense, moe], CEIL).splitlines()[3]
    assert "| 1.5000x | 1.2500-1.9000x (3) |" in line


def test_target_misses_names_each_cell_under_a_target():
    def cell(config, batch, moe_s, limit_bytes):
        r = bench.Row("m", config, "decode", batch, 512, moe_s, bench.Cost(limit_bytes, 1e9))
        return r

    rows = [cell("dense", 1, 2.0e-3, 8e9), cell("A", 1, 1.2e-3, 5e9),  # limit 1.6x, ratio 1.667x: met
            cell("B", 1, 1.35e-3, 5e9),  # 1.481x of 1.6x: 92.6 %, met at b=1 (90 %)
            cell("C", 1, 1.45e-3, 5e9),  # 1.379x: 86.2 %, under 90 % at b=1
            cell("dense", 256, 3.0e-3, 8e9), cell("D", 256, 3.1e-3, 8e9)]  # 0.968x dense: slower
    bench.fill_ratios(rows, CEIL)
    n, misses = bench.target_misses(rows)
    assert n == 4 and [m.split(":")[0] for m in misses] == ["m C decode b=1", "m D decode b=256"]
    # C must reach 0.9 * 1.6 = 1.44x: 2.0 / 1.44 ms, so 1.45 - 1.3889 ms short
    assert "about 61 us short of 1.4400x" in misses[0]
    assert "about 85 us short of 0.9950x" in misses[1]  # 3.1 - 3.0 / 0.995 ms


def test_main_times_every_config_alternately_with_one_dense_model(monkeypatch, tmp_path):
    """The run's structure, with the GPU work replaced: one dense model per shape, paired with each
    converted model in turn, cell by cell; dense's row is the median of its times over every pairing,
    each converted row the median of its own, its ratio the median of the rounds' ratios."""
    built, timed = [], []
    dense_s = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5])

    class Model:
        def __init__(self):
            self.config = None
            built.append(self)

    def time_cell(models, cell, args, log, checked):
        timed.append((cell, tuple(models)))
        if cell[0] == "decode" and args.rounds == 1:  # the warm-up
            return {"dense": [9.0]}, ""
        if cell[0] == "prefill" and args.rounds == 1:
            return {"dense": [9.0]}, "graph"
        d = [next(dense_s) for _ in range(args.rounds)]
        return {"dense": d, **{n: [0.5 * t for t in d] for n in models if n != "dense"}}, ""

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "measure_ceilings", lambda: CEIL)
    monkeypatch.setattr(bench, "build_dense", lambda name, layers=None: Model())
    monkeypatch.setattr(bench, "convert_model_", lambda model, config, calib: "converted")
    checked_tokens = []
    monkeypatch.setattr(bench, "check_fast_path", lambda model, tokens: checked_tokens.append(tokens) or 0.0)
    monkeypatch.setattr(bench, "weight_bytes", lambda model: {"total": 1, "router_and_bookkeeping": 0})
    monkeypatch.setattr(bench, "time_cell", time_cell)
    monkeypatch.setattr(bench, "cell_cost", lambda model, cell, moe, args: (bench.Cost(1e9, 1e9), bench.Cost(1e9, 1e9), None))
    assert bench.main(["--models", "llama2-7b", "--configs", "S2A2E8", "S1A1E8", "--prefill", "--decode-batches", "1", "8",
                       "--rounds", "3", "--out", str(tmp_path)]) == 0
    assert len(built) == 3  # dense once, then each converted model
    assert checked_tokens == [[1, 3, 8, 17, 129, 300]] * 2  # each converted model at every cell's size and the odd ones
    paired = [(c, names) for c, names in timed if len(names) == 2]
    assert paired == [(("decode", b, 512), ("dense", config)) for config in ("S2A2E8", "S1A1E8") for b in (1, 8)]
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["config"], r["batch"]) for r in rows] == [("dense", 1), ("dense", 8), ("S2A2E8", 1), ("S2A2E8", 8), ("S1A1E8", 1), ("S1A1E8", 8)]
    assert rows[0]["extra"]["rounds"] == [1.0, 1.1, 1.2, 2.0, 2.1, 2.2] and rows[0]["seconds"] == pytest.approx(1.6)
    assert rows[3]["extra"]["rounds"] == pytest.approx([0.65, 0.7, 0.75]) and rows[3]["ratio"] == pytest.approx(2.0)
