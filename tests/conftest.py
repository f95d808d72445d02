"""Tiny random-weight models of every supported family, built from configs in code; the Triton
kernel modules for the test files that check them."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, CONFIG_MAPPING, PreTrainedTokenizerFast

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter: set before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cmoe  # noqa: E402, F401  (registers the cmoe_* Auto classes)

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
EXTRA = {
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(head_dim=16),
}
FAMILY_TYPES = sorted(cmoe.FAMILIES)


def kernel_module(name: str):
    """``cmoe.<name>``, a module of Triton kernels, for a test file that checks it. Without a GPU
    the kernels run in Triton's interpreter on small shapes (TRITON_INTERPRET=1, set above). Skips
    the file when Triton is not installed, or when the interpreter is off without a GPU (the
    variable set to 0 by the caller)."""
    pytest.importorskip("triton", reason="triton is not installed")
    mod = importlib.import_module(f"cmoe.{name}")
    if not torch.cuda.is_available() and not importlib.import_module("cmoe.triton_experts")._INTERPRET:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)
    return mod


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = CONFIG_MAPPING[model_type](**{**TINY, **EXTRA.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random weights big enough that activations are not all tiny
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model.eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (99 tokens: fits the tiny models' vocabulary)."""
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def calib(n: int = 4, seqlen: int = 32, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


@pytest.fixture
def llama():
    return tiny_model("llama")
