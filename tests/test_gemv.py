"""cmoe.gemv against a float64 matrix-vector product: one row through a linear layer.

Without a GPU the kernel runs in Triton's interpreter (``conftest.kernel_module``), on small shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_module, tiny_model

gemv = kernel_module("gemv")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def problem(N, K, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, K, generator=g)  # [B, S, K] as a decode step's hidden states
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def rel_err(out, x, w, b):
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == want.shape and out.dtype == x.dtype
    return ((out.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("N,K", [(1, 1), (37, 100), (64, 64), (130, 1000), (300, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(N, K, dtype, bias):
    x, w, b = problem(N, K, dtype, bias, seed=N + K)
    assert gemv.serves(x, w)
    out = gemv.gemv(x.reshape(-1), w, b).reshape(1, 1, N)
    assert rel_err(out, x, w, b) < TOL[dtype]
    if DEVICE == "cuda":
        assert torch.equal(gemv.linear(x, w, b), out)


@pytest.mark.parametrize("tile", [(1, 16, 1), (4, 32, 2), (16, 64, 4)])
def test_every_tile_matches(tile):
    """Row blocks that end inside the matrix and past it, column blocks that end past K."""
    x, w, b = problem(45, 150, torch.float32, True, seed=1)
    assert rel_err(gemv.launch(x.reshape(-1), w, b, tile)[None, None], x, w, b) < TOL[torch.float32]


def test_linear_leaves_other_calls_to_torch():
    x, w, b = problem(20, 30, torch.float32, True)
    x2 = torch.cat([x, x], 1)  # two rows
    assert not gemv.serves(x2, w)
    assert not gemv.serves(x, w.double())  # mixed dtypes
    assert torch.equal(gemv.linear(x2, w, b), F.linear(x2, w, b))
    xg = x.clone().requires_grad_()
    assert not gemv.serves(xg, w)  # gradients: F.linear
    gemv.linear(xg, w, b).sum().backward()
    assert xg.grad is not None
    xc = x.cpu()
    assert torch.equal(gemv.linear(xc, w.cpu(), b.cpu()), F.linear(xc, w.cpu(), b.cpu()))  # the CPU: F.linear


def test_gemv_compiles_with_its_fake():
    x, w, b = problem(50, 70, torch.float32, True)
    torch.library.opcheck(gemv.gemv, (x.reshape(-1), w, b), test_utils=("test_schema", "test_faketensor"))
    out = torch.compile(lambda x: gemv.gemv(x.reshape(-1), w, b), fullgraph=True)(x)
    assert rel_err(out.reshape(1, 1, -1), x, w, b) < TOL[torch.float32]


def test_gemv_projections_swap_and_put_back():
    from cmoe.fused_qkv import fused_qkv

    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    o_proj, sd = attn.o_proj, {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        with fused_qkv(model), gemv.gemv_projections(model):
            assert type(attn.o_proj) is gemv.OneRowLinear and attn.o_proj.weight is o_proj.weight
            assert attn.q_proj.linear is gemv.linear
            got = model(ids).logits  # on the CPU the stand-ins call F.linear
            assert set(model.state_dict()) == set(sd)
        assert attn.o_proj is o_proj and not hasattr(attn.q_proj, "linear")
    assert torch.allclose(got, want, atol=1e-5)
    with fused_qkv(model), gemv.gemv_projections(model):
        assert attn.__dict__["_cmoe_gemv_o_proj"] is attn.o_proj  # the same stand-in again


@pytest.mark.skipif(DEVICE != "cuda", reason="gemv_projections call the kernel on a GPU only")
def test_generation_with_gemv_projections_on_the_gpu(monkeypatch):
    from cmoe import generation
    from cmoe.fused_qkv import fused_qkv

    model = tiny_model("llama").to(DEVICE)  # float32: the same greedy tokens as cuBLAS
    calls = []
    kernel = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a: calls.append(a[1].shape) or kernel(*a))
    ids = torch.randint(0, 128, (1, 6), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.no_grad():
        want = model(ids[:, :1]).logits
        with fused_qkv(model), gemv.gemv_projections(model):
            got = model(ids[:, :1]).logits  # one row: q/k/v and o_proj through gemv
    assert len(calls) == 2 * len(model.model.layers)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    out = {}
    for on in (False, True):
        monkeypatch.setattr(generation, "GEMV_PROJECTIONS", on)
        out[on] = generation.generate(model, ids, 8, compile=False)
    assert torch.equal(out[True], out[False])
