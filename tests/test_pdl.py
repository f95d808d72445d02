"""cmoe.pdl: the decode step's kernels launched with programmatic dependent launch compute what
they compute without it, bit for bit, alone, chained in a CUDA graph, and in the captured decode
step of generation. The launches need a GPU of compute capability 9.0 or more; without one the
flag must leave every launch as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calib, kernel_module, tiny_model

pdl = kernel_module("pdl")

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs compute capability 9.0+")


def test_off_without_a_gpu_that_has_it(monkeypatch):
    assert pdl.ENABLED
    x = torch.zeros(4)
    assert not pdl.on(x.device) and pdl.launch(x) == {"PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    if torch.cuda.is_available():
        assert pdl.launch(x.cuda()) == {"PDL": False}
    if HOPPER:
        monkeypatch.setattr(pdl, "ENABLED", True)
        assert pdl.launch(x.cuda()) == {"PDL": True, "launch_pdl": True}


def test_only_the_captured_step_compiles_inductor_kernels_with_pdl():
    from cmoe.generation import compiled_decode_step

    assert compiled_decode_step("default", launch_pdl=True) is compiled_decode_step("default", launch_pdl=True)
    assert compiled_decode_step("default", launch_pdl=True) is not compiled_decode_step("default")
    with pytest.raises(ValueError, match="mode 'default'"):
        compiled_decode_step("reduce-overhead", launch_pdl=True)


def _chain(ws, moe, x):
    """gemv, GEMV MoE layer, decode attention, gemv again: each kernel reads what the one before wrote."""
    from cmoe import decode_attention as da
    from cmoe import gemv
    from cmoe import triton_experts as te

    y = gemv.gemv(x[0], ws[0])  # [4 * 16]
    y = te.triton_gemv_op(y[None], *te.layer_args(moe))[0]
    q = y.view(1, 4, 1, 16)
    k = torch.cat([ws[1][:, :16].reshape(1, 4, -1, 16), q], 2)  # the cache: rows of a weight, then the new key
    out = da.decode_attention(q, k, k, None, 0.25)  # [1, 1, 4, 16]
    return gemv.gemv(out.reshape(-1), ws[2])


@needs_hopper
def test_kernels_chained_in_a_cuda_graph_are_bit_equal(monkeypatch):
    from test_triton_experts import _moe

    torch.manual_seed(0)
    ws = [torch.randn(64, 64, device="cuda", dtype=torch.bfloat16) / 8 for _ in range(3)]
    moe = _moe(torch.bfloat16, a=1, shared=30, hidden=64)
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(pdl, "ENABLED", False)
        want = _chain(ws, moe, x)
        monkeypatch.setattr(pdl, "ENABLED", True)
        assert torch.equal(_chain(ws, moe, x), want)  # eager, launched with PDL
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _chain(ws, moe, x)
        for seed in range(3):
            x.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)))
            g.replay()
            monkeypatch.setattr(pdl, "ENABLED", False)
            assert torch.equal(out, _chain(ws, moe, x)), seed
            monkeypatch.setattr(pdl, "ENABLED", True)


@needs_hopper
def test_captured_decode_step_with_pdl_gives_the_same_tokens(monkeypatch):
    """Batch 1 in bfloat16 (the GEMV paths): ours and inductor's kernels launched with PDL in the
    captured step give the tokens they give without."""
    from cmoe import CMoEConfig, convert_
    from cmoe.generation import drop_static_caches, generate

    tiny = tiny_model()
    converted = copy.deepcopy(tiny)
    convert_(converted, CMoEConfig.parse("S1A1E4", calib_samples=2, calib_seqlen=32, allocation="uniform"),
             calib(2, 32, seed=4), device="cpu", progress=False)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5)).cuda()
    for model in (tiny.cuda().bfloat16(), converted.cuda().bfloat16()):
        monkeypatch.setattr(pdl, "ENABLED", False)
        want = generate(model, ids, 9, compile=True)
        monkeypatch.setattr(pdl, "ENABLED", True)
        drop_static_caches(model)  # compiled and captured again, with PDL
        assert torch.equal(generate(model, ids, 9, compile=True), want)
        assert torch.equal(generate(model, ids, 9, compile=True), want)  # replayed
        drop_static_caches(model)
