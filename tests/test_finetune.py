"""Fine-tuning (method.md section 6): what is trained, the bias update, merge, resume, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import calib, char_tokenizer, tiny_model

import cmoe
from cmoe import finetune as ft
from cmoe.checkpoint import CheckpointError
from cmoe.config import CMoEConfig
from cmoe.data import DataError
from cmoe.finetune import FinetuneConfig, FinetuneError
from cmoe.moe import CMoEMLP, MoELayerSpec

FAST = dict(lr=1e-2, router_lr=1e-2, gamma=1e-2)  # big steps: visible changes in a few steps


def converted(name: str = "S2A2E8", model_type: str = "llama", seed: int = 0, **kw):
    model = tiny_model(model_type, seed=seed)
    cfg = CMoEConfig.parse(name, calib_samples=4, calib_seqlen=32, **kw)
    cmoe.convert_(model, cfg, calib(), device="cpu", progress=False)
    return model


@pytest.fixture(scope="module")
def base():
    return converted()


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_router_scale_gets_gradient_frozen_weights_do_not(model):
    peft_model = ft.add_lora(model, FinetuneConfig())
    peft_model.train()
    ids = calib(2, 16, seed=5)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    names = set()
    for name, p in peft_model.named_parameters():
        if name.endswith("router.scale"):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        elif "lora_B" in name:  # B starts at 0, so A gets no gradient yet; B does
            assert p.requires_grad and p.grad.abs().sum() > 0, name
        elif "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
        names.add(name.rsplit(".", 3)[0].split("layers.0.")[-1])
    # LoRA on q, k, v, o, the shared expert and the stacked routed experts (gate_up and down)
    for target in ["q_proj", "k_proj", "v_proj", "o_proj", "shared_gate_up", "shared_down"]:
        assert any(target in n and "lora_A" in n for n, _ in peft_model.named_parameters()), target
    expert_lora = [n for n, _ in peft_model.named_parameters() if "mlp.experts" in n and "lora_" in n]
    assert len(expert_lora) == 4 * 2  # (A, B) x (gate_up, down) per layer, 2 layers
    ft.merge(peft_model)


@pytest.mark.parametrize("router", ["analytical", "linear"])
def test_router_scale_gradient_is_the_derivative_through_p(router):
    """dL/dv by autograd equals a central finite difference: the gradient flows through weight = 1 + p*v."""
    model = converted(router=router).double()
    cmoe.set_expert_impl(model, "loop")  # the grouped GEMM has no float64
    moe = cmoe.moe_layers(model)[0]
    with torch.no_grad():
        moe.router.scale.copy_(torch.linspace(-0.5, 0.5, moe.spec.num_experts))
    ids = calib(2, 16, seed=6)
    for p in model.parameters():
        p.requires_grad_(p is moe.router.scale)

    def loss():  # float64 (the router keeps p in float32: hence rtol 1e-3 below)
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    (grad,) = torch.autograd.grad(loss(), moe.router.scale)
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(0), dtype=grad.dtype)
    eps = 1e-2  # the loss is smooth in v; a larger step keeps float32 rounding in p out of the difference
    with torch.no_grad():
        moe.router.scale += eps * direction
        up = loss()
        moe.router.scale -= 2 * eps * direction
        down = loss()
    assert grad.abs().sum() > 0
    torch.testing.assert_close((up - down) / (2 * eps), (grad * direction).sum(), rtol=1e-3, atol=1e-9)


def test_bias_update_rule():
    spec = MoELayerSpec(hidden_size=8, shared_size=4, num_experts=4, expert_size=4, top_k=1, act="silu")
    moe = CMoEMLP(spec)
    moe.expert_load += torch.tensor([10, 0, 2, 4])  # mean 4
    load = ft.update_bias([moe], gamma=0.5)
    assert moe.router.bias.tolist() == [-0.5, 0.5, 0.5, 0.0]  # over, under, under, at the mean
    assert load.tolist() == [[10, 0, 2, 4]] and moe.expert_load.sum() == 0


def test_bias_moves_a_skewed_router_toward_balance():
    torch.manual_seed(0)
    d, E = 16, 4
    spec = MoELayerSpec(hidden_size=d, shared_size=4, num_experts=E, expert_size=4, top_k=1, act="silu")
    moe = CMoEMLP(spec)
    with torch.no_grad():  # expert 0's representative neuron fires on every token: it wins them all
        moe.router.gate.normal_(0, 0.1)
        moe.router.up.normal_(0, 0.1)
        moe.router.gate[0] = moe.router.up[0] = torch.ones(d) / d**0.5
    moe.collect_load = True
    x = torch.randn(256, d).abs()  # [T, d], positive so that expert 0 scores high everywhere

    def step():
        with torch.no_grad():
            moe(x)
        return ft.update_bias([moe], gamma=0.05)

    first = step()
    assert first[0, 0] == 256  # fully skewed to start with
    for _ in range(60):
        last = step()
    assert moe.router.bias[0] < 0 and (moe.router.bias[1:] > 0).all()
    assert ft.imbalance(last) < 0.5 * ft.imbalance(first)  # imbalance 4 (all on one) -> near 1


def test_merged_model_equals_unmerged(model):
    peft_model = ft.add_lora(model, FinetuneConfig())
    with torch.no_grad():  # a non-trivial adapter, v and b everywhere
        g = torch.Generator().manual_seed(0)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or name.endswith("router.scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for moe in cmoe.moe_layers(model):
            moe.router.bias.copy_(torch.randn(moe.router.bias.shape, generator=g) * 0.01)
    ids = calib(2, 16, seed=7)
    unmerged = logits(peft_model.eval(), ids)
    merged_model = ft.merge(peft_model)
    assert merged_model is model and not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_short_finetune_lowers_training_loss_and_balances(model):
    ids = calib(8, 32, seed=8)
    before = model(input_ids=ids, labels=ids).loss.item()
    cfg = FinetuneConfig(epochs=4, batch_size=2, grad_accum=2, **FAST)
    moved = []  # b after each step (it can come back to exactly 0 as loads swing)

    def watch(step, loss, imbalance):
        moved.append(max(moe.router.bias.abs().max().item() for moe in cmoe.moe_layers(model)))

    report = ft.finetune_ids(model, ids, cfg, progress=False, device="cpu", callback=watch)
    after = model(input_ids=ids, labels=ids).loss.item()
    assert report.steps == 8 and report.tokens == 4 * 8 * 32 and len(report.losses) == 8
    assert after < 0.9 * before
    assert all(moe.router.scale.abs().sum() > 0 for moe in cmoe.moe_layers(model))  # v trained
    assert len(moved) == 8 and max(moved) >= FAST["gamma"]  # b updated
    assert not model.training and not any("lora" in n for n, _ in model.named_parameters())


def test_resume_reproduces_an_uninterrupted_run(base, tmp_path):
    ids = calib(6, 16, seed=9)
    cfg = FinetuneConfig(epochs=2, batch_size=1, grad_accum=2, save_every=2, **FAST)  # 6 steps

    full = copy.deepcopy(base)
    ft.finetune_ids(full, ids, cfg, state_dir=tmp_path / "a", progress=False, device="cpu")

    def crash(step, loss, imbalance):
        if step == 3:  # the state of step 2 is on disk
            raise KeyboardInterrupt

    interrupted = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune_ids(interrupted, ids, cfg, state_dir=tmp_path / "b", progress=False, device="cpu", callback=crash)
    for a, b in zip(interrupted.state_dict().values(), base.state_dict().values()):  # left unchanged
        assert torch.equal(a, b)
    assert [p.name for p in (tmp_path / "b").iterdir()] == [ft.STATE_FILE]  # no temporary file left
    with pytest.raises(FinetuneError, match="resume"):  # never silently restarted
        ft.finetune_ids(interrupted, ids, cfg, state_dir=tmp_path / "b", progress=False, device="cpu")
    with pytest.raises(FinetuneError, match="different config"):
        ft.finetune_ids(interrupted, ids, FinetuneConfig(**{**cfg.to_dict(), "lr": 1e-3}),
                        state_dir=tmp_path / "b", resume=True, progress=False, device="cpu")

    report = ft.finetune_ids(interrupted, ids, cfg, state_dir=tmp_path / "b", resume=True, progress=False, device="cpu")
    assert report.resumed_from == 2 and report.steps == 6 and len(report.losses) == 6
    full_sd = full.state_dict()
    for name, t in interrupted.state_dict().items():
        assert torch.equal(t, full_sd[name]), name


def test_interrupted_save_keeps_the_previous_state(model, tmp_path, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def dies_while_writing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second save: half a file, then the process is killed
            Path(path).write_bytes(b"half")
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune_ids(model, calib(4, 16, seed=11), FinetuneConfig(save_every=1, **FAST), state_dir=tmp_path,
                        progress=False, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == [ft.STATE_FILE]
    assert ft.read_state_meta(tmp_path / ft.STATE_FILE)["step"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_expert_implementation_backward_matches_loop(dtype):
    """The implementation "auto" picks for training on the CPU ("grouped") has the loop's gradients."""
    from cmoe.experts import default_impl, run_experts

    grads = {}
    for impl in ["loop", "auto"]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 32, generator=g).to(dtype).requires_grad_()
        gate_up = (torch.randn(5, 16, 32, generator=g) * 0.2).to(dtype).requires_grad_()
        down = (torch.randn(5, 32, 8, generator=g) * 0.2).to(dtype).requires_grad_()
        idx = torch.randint(0, 5, (40, 2), generator=g)
        weight = torch.rand(40, 2, generator=g).requires_grad_()
        run_experts(impl, x, idx, weight, gate_up, down, "silu").float().square().sum().backward()
        grads[impl] = [t.grad.float() for t in (x, gate_up, down, weight)]
    assert default_impl(x) == "grouped"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(grads["auto"], grads["loop"]):
        torch.testing.assert_close(a, b, **tol)


def test_finetune_saves_a_checkpoint_that_reloads_exactly(tmp_path):
    tok = char_tokenizer()
    model = converted()
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 40)
    out = tmp_path / "ft"
    result = ft.finetune(model, tok, data=str(text), samples=4, seqlen=24, out=out, progress=False, device="cpu",
                         **FAST)
    assert result.out == out.resolve() and not ft.state_dir_for(out).exists()
    loaded = cmoe.load(out)
    ids = calib(2, 16, seed=10)
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), rtol=0, atol=0)
    info = json.loads((out / "config.json").read_text())["cmoe"]["finetune"]
    assert info["samples"] == 4 and info["steps"] == 4 and info["lr"] == FAST["lr"]
    assert len(json.loads((out / ft.FINETUNE_FILE).read_text())["losses"]) == 4
    # the saved folder is an ordinary cmoe checkpoint: fine-tune it again, by path
    again = ft.finetune(str(out), data=str(text), samples=2, seqlen=24, out=tmp_path / "ft2", progress=False,
                        device="cpu")
    assert again.report.steps == 2


def test_bad_inputs_give_clear_errors(model, tmp_path):
    with pytest.raises(FinetuneError, match="lr=0"):
        FinetuneConfig(lr=0)
    with pytest.raises(FinetuneError, match="no trainable parameters"):
        ft.add_lora(model, FinetuneConfig(attention=(), shared=False, experts=False, router_scale=False))
    with pytest.raises(FinetuneError, match="convert it first"):
        ft.add_lora(tiny_model("llama"))
    with pytest.raises(FinetuneError, match="max_position_embeddings"):
        ft.finetune_ids(model, calib(1, 300), progress=False, device="cpu")  # tiny models: 256 positions
    with pytest.raises(FinetuneError, match=r"\[N >= 1, S >= 2\]"):
        ft.finetune_ids(model, calib(1, 16)[0], progress=False, device="cpu")
    with pytest.raises(FinetuneError, match="unknown dtype"):
        ft.finetune_ids(model, calib(1, 16), dtype="float33", progress=False, device="cpu")
    with pytest.raises(FinetuneError, match="needs a state_dir"):
        ft.finetune_ids(model, calib(1, 16), resume=True, progress=False, device="cpu")
    tok = char_tokenizer()
    text = tmp_path / "short.txt"
    text.write_text("too short\n\n" * 5)
    with pytest.raises(DataError, match="fewer than seqlen"):
        ft.finetune(model, tok, data=str(text), samples=2, seqlen=200, progress=False, device="cpu")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(CheckpointError, match="not empty"):
        ft.finetune(model, tok, data=str(text), samples=2, seqlen=8, out=busy, progress=False, device="cpu")
    with pytest.raises(FinetuneError, match="FinetuneConfig fields"):
        ft.finetune(model, tok, data=str(text), samples=2, seqlen=8, learning_rate=1.0, progress=False, device="cpu")
    assert all(p.requires_grad for p in model.parameters())  # nothing above changed the model
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_cli_finetune(tmp_path, capsys):
    from cmoe.cli import main

    tok = char_tokenizer()
    src = cmoe.save(converted(), tmp_path / "moe", tokenizer=tok)
    text = tmp_path / "train.txt"
    text.write_text("Pack my box with five dozen liquor jugs.\n\n" * 40)
    rc = main(["finetune", str(src), "--data", str(text), "--samples", "4", "--seqlen", "24",
               "--out", str(tmp_path / "ft"), "--batch-size", "2", "--lr", "1e-3", "--save-every", "1",
               "--device", "cpu", "--eval", str(text), "--eval-windows", "1"])
    assert rc == 0 and cmoe.checkpoint.is_checkpoint(tmp_path / "ft")
    printed = capsys.readouterr().out
    assert "training loss" in printed and "held-out perplexity" in printed
    rc = main(["finetune", str(src), "--data", str(text), "--samples", "4", "--seqlen", "24",
               "--out", str(tmp_path / "ft")])
    assert rc == 2 and "not empty" in capsys.readouterr().out
    rc = main(["finetune", str(src), "--data", str(text), "--samples", "4", "--seqlen", "24",
               "--out", str(tmp_path / "ft3"), "--lr", "-1"])
    assert rc == 2 and "lr=-1" in capsys.readouterr().out
