"""cmoe.evaluate: perplexity against a hand computation, uniform logits, comparison table."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cmoe import evaluate
from cmoe.evaluate import compare_perplexity, format_table, perplexity

VOCAB = 97


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


class Uniform(nn.Module):
    """Same logit for every token: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.w)


class CharTokenizer:
    """No-hub stand-in for eval_windows: one token per character, ids modulo VOCAB."""

    name_or_path = "char-tokenizer"

    def __len__(self):
        return VOCAB

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=True):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}


def reference_ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits.float()  # [n, L, V]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (5, 24), generator=torch.Generator().manual_seed(0))  # [n, seqlen]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_matches_hand_computation(windows, batch_size, monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(evaluate, "LOSS_CHUNK", 7)  # several chunks per window
    got = perplexity(model, windows, batch_size=batch_size, progress=False)
    assert got == pytest.approx(reference_ppl(model, windows), rel=1e-5)


def test_uniform_logits_give_vocab_size(windows):
    assert perplexity(Uniform(VOCAB), windows, progress=False) == pytest.approx(VOCAB, rel=1e-6)


def test_bfloat16_model_close_to_float32(windows):
    model = tiny_llama()
    ref = perplexity(model, windows, progress=False)
    assert perplexity(model.to(torch.bfloat16), windows, progress=False) == pytest.approx(ref, rel=0.05)


def test_restores_training_mode(windows):
    model = tiny_llama().train()
    perplexity(model, windows, progress=False)
    assert model.training


@pytest.mark.parametrize("shape", [(24,), (0, 24), (3, 1)])
def test_rejects_bad_windows(shape):
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(Uniform(VOCAB), torch.zeros(shape, dtype=torch.long), progress=False)


def test_compare_and_table(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("\n\n".join(f"Paragraph {i}: some words to predict." for i in range(40)), encoding="utf-8")
    llama = tiny_llama()
    models = {"dense": llama, "uniform": Uniform(VOCAB)}
    results = compare_perplexity(models, CharTokenizer(), [str(f)], seqlen=32, max_windows=4)
    assert list(results) == [str(f)] and list(results[str(f)]) == ["dense", "uniform"]
    assert results[str(f)]["uniform"] == pytest.approx(VOCAB)
    table = format_table(results)
    ratio = results[str(f)]["uniform"] / results[str(f)]["dense"]
    assert "uniform / dense" in table and f"{ratio:.3f}x" in table and "97.000" in table
