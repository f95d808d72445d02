"""benchmarks/bench_ab.py on the CPU: how arms are read, their settings applied and put back, and
the summary table (the timing itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch._inductor.config as inductor_config

import cmoe.generation as generation

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ab.py"
_spec = importlib.util.spec_from_file_location("bench_ab", _PATH)
ab = importlib.util.module_from_spec(_spec)
sys.modules["bench_ab"] = ab  # dataclasses look their module up there
_spec.loader.exec_module(ab)


def test_arms_are_read_with_their_modules_attributes_keys_and_values():
    assert ab.parse_arm("default") == ab.Arm("default", [])
    arm = ab.parse_arm("cd: torch._inductor.config.coordinate_descent_tuning = True; "
                       "torch._inductor.config.triton.multi_kernel=1")
    assert arm.name == "cd" and arm.recompiles
    assert arm.settings == [
        ab.Setting("torch._inductor.config", "coordinate_descent_tuning", None, True),
        ab.Setting("torch._inductor.config", "triton.multi_kernel", None, 1),  # a nested inductor setting
    ]
    arm = ab.parse_arm("tiles: cmoe.generation.ARGMAX_CHUNK = 512 ; cmoe.triton_experts.GEMV_CONFIG['down'] = (4, 512, 2)")
    assert not arm.recompiles
    assert arm.settings == [
        ab.Setting("cmoe.generation", "ARGMAX_CHUNK", None, 512),
        ab.Setting("cmoe.triton_experts", "GEMV_CONFIG", "down", (4, 512, 2)),
    ]


@pytest.mark.parametrize("text,match", [
    (": cmoe.generation.ARGMAX_CHUNK = 1", "no name"),
    ("a: cmoe.generation.ARGMAX_CHUNK", "no '= VALUE'"),
    ("a: cmoe.generation.ARGMAX_CHUNK = two", "not a Python literal"),
    ("a: 3x = 1", "bad setting target"),
    ("a: no_such_package_xyz.attr = 1", "no importable module"),
])
def test_bad_arms_say_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        ab.parse_arm(text)


def test_settings_apply_inside_and_are_put_back_even_after_an_error():
    chunk, cd, mk = generation.ARGMAX_CHUNK, inductor_config.coordinate_descent_tuning, inductor_config.triton.multi_kernel
    arm = ab.parse_arm("x: cmoe.generation.ARGMAX_CHUNK = 7; torch._inductor.config.coordinate_descent_tuning = True; "
                       "torch._inductor.config.triton.multi_kernel = 3")
    with ab.applied(arm):
        assert generation.ARGMAX_CHUNK == 7 and inductor_config.coordinate_descent_tuning is True
        assert inductor_config.triton.multi_kernel == 3
    assert generation.ARGMAX_CHUNK == chunk and inductor_config.coordinate_descent_tuning is cd
    assert inductor_config.triton.multi_kernel == mk
    with pytest.raises(RuntimeError), ab.applied(arm):
        raise RuntimeError("inside the arm")
    assert generation.ARGMAX_CHUNK == chunk and inductor_config.coordinate_descent_tuning is cd
    assert inductor_config.triton.multi_kernel == mk


def test_a_dict_item_is_set_in_a_new_dict_and_the_old_one_put_back(monkeypatch):
    old = {"gate_up": (2, 2048, 2), "down": (8, 512, 4)}
    monkeypatch.setattr(generation, "_AB_TEST_CONFIG", old, raising=False)
    with ab.applied(ab.parse_arm("d: cmoe.generation._AB_TEST_CONFIG['down'] = (4, 512, 2)")):
        assert generation._AB_TEST_CONFIG == {"gate_up": (2, 2048, 2), "down": (4, 512, 2)}
        assert old["down"] == (8, 512, 4)  # not mutated: code holding the old dict sees no change
    assert generation._AB_TEST_CONFIG is old


def test_summary_takes_medians_over_rounds_and_ratios_within_each_arm():
    arms = [ab.Arm("a", []), ab.Arm("b", [])]
    results = {
        "a": [{"dense": 0.60, "S1A1E8": 0.40}, {"dense": 0.62, "S1A1E8": 0.40}, {"dense": 0.70, "S1A1E8": 0.50}],
        "b": [{"dense": 0.50, "S1A1E8": 0.25}],
    }
    lines = ab.summary(results, arms, ["dense", "S1A1E8"]).splitlines()
    assert lines[0] == "| arm | dense (ms) | S1A1E8 (ms) | S1A1E8 vs dense |"
    assert lines[2] == "| a | 0.6200 | 0.4000 | 1.5000x |"  # ratios 1.5, 1.55, 1.4: median 1.5
    assert lines[3] == "| b | 0.5000 | 0.2500 | 2.0000x |"


def test_main_needs_a_gpu_and_distinct_arm_names(monkeypatch, capsys):
    monkeypatch.setattr(ab.torch.cuda, "is_available", lambda: False)
    assert ab.main(["--arm", "a"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab.main(["--arm", "a", "--arm", "a: cmoe.generation.ARGMAX_CHUNK = 1"])
    assert "arm names must differ" in capsys.readouterr().err


def test_prefill_cells_are_read_as_batch_by_length(monkeypatch, capsys):
    assert ab.bench.shape_arg("8x2048") == (8, 2048)
    monkeypatch.setattr(ab.torch.cuda, "is_available", lambda: False)
    for bad in ("2048", "1x", "0x2048", "1x-5", "ax2"):
        with pytest.raises(ab.argparse.ArgumentTypeError, match="expected BxS"):
            ab.bench.shape_arg(bad)
        with pytest.raises(SystemExit):  # checked before the GPU is looked for
            ab.main(["--prefill", bad, "--arm", "a"])
        assert "expected BxS" in capsys.readouterr().err


def test_each_decode_batch_is_timed_with_the_same_models_in_every_round_and_arm(monkeypatch, capsys):
    """``--batch 128 256``: the models are built once per shape, then every batch gets its own
    rounds (each arm in each) and its own summary, each step timed at that batch."""
    built, timed = [], []

    class Model:
        def __init__(self):
            self.converted = False

    def build_dense(shape, layers):
        built.append(shape)
        return Model()

    def convert(model, config):
        model.converted = True

    def time_decode(model, batch, prompt, steps, min_passes):
        timed.append(batch)
        return batch * (0.5e-6 if model.converted else 1e-6)  # the converted model twice as fast

    monkeypatch.setattr(ab.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ab.torch.cuda, "get_device_name", lambda: "fake GPU")
    monkeypatch.setattr(ab.bench, "build_dense", build_dense)
    monkeypatch.setattr(ab.bench, "convert_model_", convert)
    monkeypatch.setattr(generation, "time_decode", time_decode)
    monkeypatch.setattr(generation, "drop_static_caches", lambda model: None)
    assert ab.main(["--configs", "S1A1E8", "--batch", "128", "256", "--rounds", "2", "--arm", "a", "--arm",
                    "b: cmoe.generation.ARGMAX_CHUNK = 1"]) == 0
    out = capsys.readouterr().out
    assert built == ["llama2-7b", "llama2-7b"]  # dense and S1A1E8, once
    assert timed == [128] * 8 + [256] * 8  # 2 rounds x 2 arms x 2 models per batch
    for b, ms in ((128, 0.128), (256, 0.256)):
        assert f"llama2-7b, b={b}, 4 layers, median over 2 rounds" in out
        assert f"| a | {ms:.4f} | {ms / 2:.4f} | 2.0000x |" in out
