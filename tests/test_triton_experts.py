"""Every routed-expert path against the loop oracle.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest before the kernels are defined), on small odd shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import kernel_module

from cmoe import activations, experts
from cmoe.moe import ROUTERS, CMoEMLP, MoELayerSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
ACTS = ["silu", "gelu_tanh", "gelu", "relu"]


def problem(T, a, E, d=36, m=20, dtype=torch.float32, seed=0, empty=1):
    """Random routed-expert inputs; the last ``empty`` experts receive no token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    idx = torch.stack([torch.randperm(E - empty, generator=g)[:a] for _ in range(T)]) if T else torch.zeros(0, a, dtype=torch.long)
    w = torch.rand(T, a, generator=g) + 0.5
    gu = torch.randn(E, 2 * m, d, generator=g) / d**0.5
    dn = torch.randn(E, d, m, generator=g) / m**0.5
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), idx.to(DEVICE), w.to(DEVICE), cast(gu), cast(dn)


def oracle(x, idx, w, gu, dn, act):
    return experts.loop_experts(x.double(), idx, w.double(), gu.double(), dn.double(), act)


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- torch paths (no Triton)
@pytest.mark.parametrize("impl", ["gather", "grouped", "select", "dense"])
@pytest.mark.parametrize("T,a", [(1, 1), (3, 2), (17, 3)])
def test_torch_paths_match_loop(impl, T, a):
    x, idx, w, gu, dn = problem(T, a, E=5, d=48, m=24, dtype=torch.float32)  # grouped_mm: 16-byte aligned rows
    if impl == "grouped" and DEVICE == "cuda":
        x, gu, dn = x.bfloat16(), gu.bfloat16(), dn.bfloat16()
    out = experts.EXPERT_IMPLS[impl](x, idx, w, gu, dn, "silu")
    assert rel_err(out, oracle(x, idx, w, gu, dn, "silu")) < TOL[x.dtype]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_path_with_shared_expert_every_activation(act, dtype):
    """The CPU decode path: 1 and 2 tokens over 6 experts (most get no token), shared expert in the loop."""
    for T in (1, 2):
        x, idx, w, gu, dn = problem(T, 2, 6, d=48, m=24, seed=7 + T)
        sgu, sd = _shared(24, d=48, seed=7)
        ref = oracle(x, idx, w, gu, dn, act) + shared_oracle(x, sgu, sd, act)
        out = experts.run_experts("select", x.to(dtype), idx, w, gu.to(dtype), dn.to(dtype), act,
                                  shared=(sgu.to(dtype), sd.to(dtype)))
        assert out.dtype == dtype
        assert rel_err(out.float(), ref) < TOL[dtype]


# ----------------------------------------------------------------------------- Triton paths
te = kernel_module("triton_experts")


def _run(path, x, idx, w, gu, dn, act):
    if path == "gemv":
        return te._gemv_experts(x, idx, w, gu, dn, act)
    if path == "few":
        return te._few_experts(x, idx, w, gu, dn, act).sum(1)  # one partial sum per group of experts
    if path == "grouped":
        return te._grouped_experts(x, idx, w, gu, dn, act).sum(1)  # one output per (token, slot)
    if path == "grouped-sorted":  # the torch-ops alignment used for very many pairs
        old = te.ALIGN_KERNEL_MAX_COUNTS
        te.ALIGN_KERNEL_MAX_COUNTS = 0
        try:
            return te._grouped_experts(x, idx, w, gu, dn, act).sum(1)
        finally:
            te.ALIGN_KERNEL_MAX_COUNTS = old
    return experts.run_experts("triton", x, idx, w, gu, dn, act)  # the registered op


CASES = [(1, 1, 4), (1, 3, 5), (3, 2, 6), (17, 3, 6), (129, 2, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["op", "gemv", "few", "grouped", "grouped-sorted"])
@pytest.mark.parametrize("T,a,E", CASES)
def test_triton_matches_loop(path, T, a, E, dtype):
    if path == "gemv" and T > 17:
        pytest.skip("the GEMV path serves few tokens (and is slow in the interpreter)")
    if path == "few" and T > te.FEW_MAX_TOKENS:
        pytest.skip("the few-token path serves up to FEW_MAX_TOKENS tokens")
    act = ACTS[(T + a) % len(ACTS)]
    x, idx, w, gu, dn = problem(T, a, E, d=36, m=20, dtype=dtype, seed=T * 10 + a)
    out = _run(path, x, idx, w, gu, dn, act)
    assert out.dtype == x.dtype
    assert rel_err(out, oracle(x, idx, w, gu, dn, act)) < TOL[dtype]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("path", ["gemv", "few", "grouped"])
def test_every_activation(act, path):
    x, idx, w, gu, dn = problem(5, 2, 5, d=40, m=24, seed=3)
    assert rel_err(_run(path, x, idx, w, gu, dn, act), oracle(x, idx, w, gu, dn, act)) < TOL[torch.float32]


def _compile_check(*args: str):
    """Run tests/triton_compile_check.py in a fresh process without TRITON_INTERPRET (skip if
    Triton's NVIDIA backend or the compile API it drives is missing)."""
    import subprocess
    import sys
    from pathlib import Path

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    run = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 2:
        pytest.skip(run.stdout.strip()[-300:])
    return run


def test_every_kernel_passes_the_gpu_compilers_front_end():
    """The interpreter skips the compiler's type checks: lower every kernel to Triton IR for an
    sm_90 GPU in a fresh process (no TRITON_INTERPRET), as ``triton.compile`` would on the H200."""
    run = _compile_check()
    failed = [line for line in run.stdout.splitlines() if not line.startswith("ok")]
    assert run.returncode == 0 and not failed, "\n".join(failed) + run.stderr[-2000:]
    assert sum(line.startswith("ok") for line in run.stdout.splitlines()) >= 50


def test_expert_kernels_load_weights_in_vectors():
    """Compiled for sm_90 with the runtime's alignment specialisation, no bf16 expert kernel
    loads its weights one element at a time (the 2-3x slowdown that Triton 3.6 gave to pointers
    picked by an ``if``; see ``triton_compile_check.py``)."""
    run = _compile_check("--loads")
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and all(line.startswith("ok") for line in lines), "\n".join(lines) + run.stderr[-2000:]
    assert len(lines) >= 20


def test_no_tokens_and_aliases():
    x, idx, w, gu, dn = problem(0, 2, 4)
    assert experts.run_experts("triton", x, idx, w, gu, dn, "silu").shape == (0, 36)
    x, idx, w, gu, dn = problem(2, 1, 4)
    ref = oracle(x, idx, w, gu, dn, "silu")
    assert rel_err(experts.run_experts("triton", x, idx, w, gu, dn, "swish"), ref) < 1e-4  # HF alias


def _shared(ms, d=36, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sgu = torch.randn(2 * ms, d, generator=g) / d**0.5
    sd = torch.randn(d, ms, generator=g) / max(ms, 1) ** 0.5
    return sgu.to(DEVICE, dtype), sd.to(DEVICE, dtype)


def shared_oracle(x, sgu, sd, act):
    g, u = (x.double() @ sgu.double().T).chunk(2, dim=-1)
    return (activations.apply(act, g) * u) @ sd.double().T


# ms = 40: two whole pieces of m = 20; 33 and 7: a partial last piece
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["gemv", "few", "grouped", "op"])
@pytest.mark.parametrize("T,a,E,ms", [(1, 1, 4, 40), (1, 3, 5, 33), (3, 2, 6, 7), (17, 3, 6, 45), (70, 2, 7, 20)])
def test_shared_expert_folded_into_the_kernels(path, T, a, E, ms, dtype):
    if path == "gemv" and T > 3:
        pytest.skip("the GEMV path serves few tokens (and is slow in the interpreter)")
    if path == "few" and T > te.FEW_MAX_TOKENS:
        pytest.skip("the few-token path serves up to FEW_MAX_TOKENS tokens")
    act = ACTS[(T + ms) % len(ACTS)]
    x, idx, w, gu, dn = problem(T, a, E, d=36, m=20, dtype=dtype, seed=ms)
    sgu, sd = _shared(ms, dtype=dtype, seed=ms)
    if path == "op":
        out = experts.run_experts("triton", x, idx, w, gu, dn, act, shared=(sgu, sd))
    else:
        fn = {"gemv": te._gemv_experts, "few": te._few_experts, "grouped": te._grouped_experts}[path]
        out = fn(x, idx, w, gu, dn, act, shared=(sgu, sd))
        if path == "grouped":
            assert out.shape == (T, -(-ms // 20) + a, x.shape[1])  # one output per (token, slot): S pieces + a
        if path != "gemv":
            out = out.sum(1)
    ref = oracle(x, idx, w, gu, dn, act) + shared_oracle(x, sgu, sd, act)
    assert out.dtype == x.dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [32, 36], ids=["even-k", "odd-k"])
@pytest.mark.parametrize("T,a,E,ms", [(1, 1, 4, 0), (1, 2, 5, 33), (9, 2, 6, 0), (40, 3, 6, 45)])
def test_grouped_paired_gate_up(T, a, E, ms, d, dtype):
    """The grouped gate/up kernel with gate and up rows interleaved in one product (``paired``),
    with and without d a multiple of BK: the loop's result and the two-product kernel's, for one
    token, experts that get none, neurons that do not fill the last block, the shared pieces."""
    act = ACTS[(T + d) % len(ACTS)]
    x, idx, w, gu, dn = problem(T, a, E, d=d, m=20, dtype=dtype, seed=T + d)
    shared = _shared(ms, d=d, dtype=dtype, seed=ms) if ms else None
    ref = oracle(x, idx, w, gu, dn, act) + (shared_oracle(x, *shared, act) if ms else 0)
    outs = []
    for paired in (False, True):
        cfg = dict(bt=16, gate_up=(16, 16, 4, 1), down=(16, 16, 4, 1), paired=paired)
        outs.append(te._grouped_experts(x, idx, w, gu, dn, act, cfg=cfg, shared=shared).sum(1))
        assert rel_err(outs[-1], ref) < TOL[dtype]
    assert rel_err(outs[1], outs[0].double()) < TOL[dtype] / 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("a", [1, 2])
@pytest.mark.parametrize("slots", [True, False], ids=["slots", "summed"])
def test_shared_expert_beyond_the_fold_limit(monkeypatch, a, dtype, slots):
    """Many tokens: the shared expert runs as a dense GEMM next to the kernels; same result (also
    for one token, and with experts that get none). PREFILL_SLOTS: its output is slot 0 and the
    routed experts' slots follow, for the caller to sum; off: the op sums them."""
    for name in ("SHARED_FOLD_MAX_TOKENS", "GEMV_MAX_PAIRS", "FEW_MAX_TOKENS"):  # the prefill path from one token
        monkeypatch.setattr(te, name, 0)
    monkeypatch.setattr(te, "PREFILL_SLOTS", slots)
    for T in (1, 9):
        assert te._plan(T, a, 30, 20, 5) == ("grouped", 0)
        x, idx, w, gu, dn = problem(T, a, 5, dtype=dtype, seed=4 + T, empty=2)
        sgu, sd = _shared(30, dtype=dtype, seed=4)
        y = te.triton_experts_op(x, idx, w, gu, dn, "gelu_tanh", sgu, sd)
        assert y.shape == (T, 1 + a if slots else 1, x.shape[1])
        assert te._slots(T, a, 30, 20, 5) == y.shape[1]  # what the op's fake says
        ref = oracle(x, idx, w, gu, dn, "gelu_tanh") + shared_oracle(x, sgu, sd, "gelu_tanh")
        assert rel_err(y.float().sum(1), ref) < TOL[dtype]
        if slots:
            assert torch.equal(y[:, 0], te.dense_expert(x, sgu, sd, "gelu_tanh"))
            assert rel_err(y[:, 1:].float().sum(1), oracle(x, idx, w, gu, dn, "gelu_tanh")) < TOL[dtype]


ALIGN_VARIANTS = ["kernel", "kernel-small-loads", "torch"]


def _align_variant(monkeypatch, kernel: str) -> None:
    """The alignment and sort by the kernels (also reading the per-chunk counts two chunks at a
    time: small loads) or by the torch ops."""
    monkeypatch.setattr(te, "ALIGN_KERNEL_MAX_COUNTS", 0 if kernel == "torch" else 1 << 30)
    if kernel == "kernel-small-loads":
        monkeypatch.setattr(te, "ALIGN_COUNT_BLOCK", 32)


@pytest.mark.parametrize("T,a,E,bt", [(1, 1, 3, 16), (17, 3, 6, 16), (129, 2, 8, 64), (256, 1, 5, 64), (300, 2, 40, 16)])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("kernel", ALIGN_VARIANTS)
def test_align_covers_every_pair_once(monkeypatch, T, a, E, bt, shared, kernel):
    """Also with the per-chunk counts read two chunks at a time (small loads)."""
    _, idx, *_ = problem(T, a, E)
    _align_variant(monkeypatch, kernel)
    sorted_ids, tile_expert = te.align(idx, E, bt, shared)
    P = T * (shared + a)
    max_tiles = -(-P // bt) + shared + E
    assert sorted_ids.shape == (max_tiles * bt,) and tile_expert.shape == (max_tiles,)  # static shapes
    te_ = tile_expert.cpu()
    used = te_ >= 0
    assert used[: int(used.sum())].all()  # used tiles first, then -1
    assert (te_[used].diff() >= 0).all()  # one run of tiles per expert, in expert order
    ids = sorted_ids.cpu().view(max_tiles, bt)[used]  # slots of unused tiles are never read
    real = ids[ids < P]
    assert torch.equal(real.sort().values, torch.arange(P, dtype=real.dtype))  # every pair once
    assert (ids <= P).all()  # pair index or the padding sentinel P
    pieces = torch.arange(shared).expand(T, shared)
    virtual = torch.cat([pieces, idx.cpu() + shared], dim=1).reshape(-1)  # each pair's virtual expert
    for row, e in zip(ids, te_[used]):
        pairs = row[row < P].long()
        assert len(pairs) and (virtual[pairs] == e).all()  # a tile holds one expert's pairs
        assert (pairs.diff() > 0).all()  # in pair order (stable)
        assert (row[len(pairs):] == P).all()  # padding only at the end


@pytest.mark.parametrize("T,a,E", [(1, 1, 4), (3, 2, 5), (300, 2, 7), (700, 3, 40)])
@pytest.mark.parametrize("kernel", ALIGN_VARIANTS)
def test_sort_pairs_orders_by_expert_stably(monkeypatch, T, a, E, kernel):
    """The grouped_mm path's sort: the same order as a stable sort of the pairs by expert, each
    expert's end row, and each pair's row; one chunk and many, experts that get no pair."""
    _, idx, *_ = problem(T, a, E, empty=2)
    _align_variant(monkeypatch, kernel)
    tokens, ends, pos = te.sort_pairs(idx, E)
    flat = idx.reshape(-1).cpu()
    order = torch.sort(flat, stable=True).indices
    assert tokens.dtype == torch.int32 and torch.equal(tokens.long().cpu(), order // a)
    assert ends.dtype == torch.int32 and torch.equal(ends.long().cpu(), torch.bincount(flat, minlength=E).cumsum(0))
    assert pos.dtype == torch.int64 and torch.equal(pos.cpu()[order], torch.arange(T * a))


# ----------------------------------------------------------------------------- fused router
def _router(E, a, act, dtype, d=40, seed=0, kind="analytical"):
    spec = MoELayerSpec(hidden_size=d, shared_size=0, num_experts=E, expert_size=4, top_k=a, act=act, router=kind)
    r = ROUTERS[kind](spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (r.weight,) if kind == "linear" else (r.gate, r.up):
            p.copy_(torch.randn(E, d, generator=g) / (d**0.5 if kind == "linear" else 1))
        r.scale.copy_(torch.randn(E, generator=g))
        r.bias.copy_(torch.randn(E, generator=g) * 0.01)
    return r.to(DEVICE, dtype)


@pytest.mark.parametrize("kind", ["analytical", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,E,a,act", [(1, 5, 1, "silu"), (3, 7, 2, "gelu_tanh"), (17, 14, 3, "gelu"), (300, 20, 2, "relu")])
def test_fused_router_matches(T, E, a, act, dtype, kind):
    r = _router(E, a, act, dtype, kind=kind)
    x = torch.randn(T, 40, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    with torch.no_grad():
        i0, w0, p0 = r.forward_reference(x)  # the torch router (r(x) is the fused one on CUDA)
        i1, w1, p1 = te.fused_route(r, x)
        i2, w2, p2 = te.fused_route(r, x)  # the split-d scratch must be left clean
    assert i1.dtype == torch.int64 and w1.dtype == torch.float32 and p1.shape == (T, E)
    # the analytical router's scores reach about 40 here (unit-variance weights, d = 40): fp32
    # rounding in another summation order moves its probabilities by up to about 2e-5
    tol = dict(atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(p1, p0, **tol)
    assert (i1 == i0).float().mean() > 0.99  # ties aside, the same experts
    same = (i1 == i0).all(1)
    torch.testing.assert_close(w1[same], w0[same], **tol)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)


@pytest.mark.parametrize("d", [150, 330, 64])
@pytest.mark.parametrize("kind", ["analytical", "linear"])
@pytest.mark.parametrize("T", [5, 37])
def test_fused_router_sums_every_slice_of_d(monkeypatch, d, kind, T):
    """The split router: the scores are summed over slices of d of 64 columns: 3 (the last one
    partial), 6, and a single slice; 5 tokens in one program, 37 in two wide ones (the second
    partial), with slices of 128 columns."""
    monkeypatch.setattr(te, "ROUTE_SPLIT_K", 64)
    monkeypatch.setattr(te, "ROUTE_WIDE_MIN_TOKENS", 20)
    monkeypatch.setattr(te, "ROUTE_WIDE_TILE", 32)
    monkeypatch.setattr(te, "ROUTE_WIDE_SPLIT_K", 128)  # slices of 128: 2, 3 and 1
    assert te._route_split(T) == ((32, 128) if T == 37 else (te.ROUTE_TILE, 64))
    r = _router(9, 2, "silu", torch.float32, d=d, kind=kind)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(d)).to(DEVICE)
    with torch.no_grad():
        i0, w0, p0 = r.forward_reference(x)
        i1, w1, p1 = te.fused_route(r, x)
    torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-4)
    assert torch.equal(i1, i0)
    torch.testing.assert_close(w1, w0, atol=1e-5, rtol=1e-4)


def _moe(dtype=torch.float32, act="silu", a=2, shared=20, router="analytical", hidden=36):
    spec = MoELayerSpec(hidden_size=hidden, shared_size=shared, num_experts=5, expert_size=20, top_k=a, act=act, router=router)
    mod = CMoEMLP(spec, impl="triton")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return mod.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("T,shared,router", [(1, 20, "analytical"), (3, 30, "linear"), (17, 20, "linear"), (5, 0, "analytical")])
def test_cmoe_mlp_triton_matches_reference(T, shared, router):
    mod = _moe(shared=shared, router=router)
    x = torch.randn(2, T, 36).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), mod.forward_reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("B,T,counts,prefill", [(1, 1, False, False), (1, 3, False, False), (2, 17, False, False),
                                                (1, 70, False, False), (1, 70, True, False), (1, 70, False, True)],
                         ids=["gemv-op", "few", "grouped", "dense-op", "dense-torch", "grouped-prefill"])
def test_cmoe_mlp_compiles_fullgraph(B, T, counts, prefill, monkeypatch):
    monkeypatch.setattr(te, "DENSE_MIN_TOKENS", 10**6 if prefill else 64)  # 70 tokens: the dense path, as one op or
    if prefill:  # (load counts asked for) as torch ops; or the grouped path beyond the fold, the shared expert's slot
        monkeypatch.setattr(te, "SHARED_FOLD_MAX_TOKENS", 32)
    mod = _moe()
    mod.collect_load = counts
    x = torch.randn(B, T, 36).to(DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        f = torch.compile(mod, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
        torch.testing.assert_close(f(x), mod.forward_reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 3, 100])
def test_few_token_path_any_number_of_expert_groups(groups):
    """The few-token down kernel's partial sums over groups of experts add up to the whole,
    for one group, groups of unequal size, and more groups than experts (one each)."""
    x, idx, w, gu, dn = problem(6, 2, 7, d=36, m=20, seed=groups, empty=2)
    sgu, sd = _shared(45, seed=groups)  # 3 pieces, the last partial
    cfg = {**te.FEW_CONFIG, "groups": groups}
    out = te._few_experts(x, idx, w, gu, dn, "silu", cfg, shared=(sgu, sd))
    assert out.shape == (6, min(groups, 3 + 7), 36)  # 3 shared pieces + 7 experts
    ref = oracle(x, idx, w, gu, dn, "silu") + shared_oracle(x, sgu, sd, "silu")
    assert rel_err(out.sum(1), ref) < TOL[torch.float32]


@pytest.mark.parametrize("T,a,ms", [(1, 2, 20), (5, 2, 0), (17, 2, 30), (70, 2, 20), (3, 0, 20)])
@pytest.mark.parametrize("fold", [256, 16], ids=["folded", "prefill"])
def test_op_fake_matches_real(monkeypatch, T, a, ms, fold):
    """The op's fake (meta) implementation, which torch.compile traces, gives the real output's
    shape (one output per (token, slot) on the grouped path, the shared expert's slot too beyond
    SHARED_FOLD_MAX_TOKENS) and dtype."""
    monkeypatch.setattr(te, "SHARED_FOLD_MAX_TOKENS", fold)
    x, idx, w, gu, dn = problem(T, max(a, 1), 5, d=36, m=20, seed=T)
    idx, w = idx[:, :a], w[:, :a]
    sgu, sd = _shared(ms, seed=T)
    torch.library.opcheck(te.triton_experts_op, (x, idx, w, gu, dn, "silu", sgu, sd),
                          test_utils=("test_schema", "test_faketensor"))


def test_grad_falls_back_to_torch():
    """The Triton op has no backward: with gradients on, "auto" uses a torch path."""
    mod = _moe()
    mod.impl = "auto"
    x = torch.randn(4, 36, device=DEVICE, requires_grad=True)
    mod(x).sum().backward()
    assert x.grad is not None and mod.router.scale.grad is not None


# ----------------------------------------------------------------------------- masked path (the whole layer)
def _masked(mod, x, cfg=None):
    """The masked path's output for a CMoEMLP ``mod``: router and experts in two kernels."""
    shared = (mod.shared_gate_up.weight, mod.shared_down.weight) if mod.spec.shared_size else None
    return te._masked_moe(x, mod.experts.gate_up_proj, mod.experts.down_proj, shared, te.router_args(mod.router),
                          mod.spec.act, mod.spec.top_k, cfg)


def _biased(mod, seed=0):
    g = torch.Generator().manual_seed(seed)
    mod.router.bias.copy_((torch.randn(mod.spec.num_experts, generator=g) * 0.05).to(mod.router.bias))
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,a,shared,router", [(1, 2, 20, "analytical"), (3, 1, 45, "linear"), (17, 2, 0, "linear"),
                                               (40, 3, 30, "analytical")])
def test_masked_path_matches_reference(T, a, shared, router, dtype):
    """Odd token counts, one token (most experts get none), tiles of 16 tokens (17 and 40:
    a partial last tile), a partial last shared piece (45, 30), both routers, a bias in the choice."""
    act = ACTS[(T + a) % len(ACTS)]
    mod = _biased(_moe(dtype, act=act, a=a, shared=shared, router=router), seed=T)
    x = torch.randn(T, 36, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    cfg = {**te.masked_config(T), "bt": 16}
    with torch.no_grad():
        out = _masked(mod, x, cfg)
        ref = mod.float().forward_reference(x.float()).double()
    assert out.shape[0] == T and out.shape[2] == 36 and out.dtype == dtype  # [T, K, d]: K groups of experts
    assert rel_err(out.sum(1), ref) < TOL[dtype]


@pytest.mark.parametrize("groups", [1, 3, 100])
def test_masked_path_any_number_of_expert_groups(groups):
    mod = _biased(_moe(shared=45))  # 3 pieces, the last partial, + 5 experts
    x = torch.randn(6, 36, generator=torch.Generator().manual_seed(groups)).to(DEVICE)
    with torch.no_grad():
        out = _masked(mod, x, {**te.masked_config(6), "groups": groups})
        ref = mod.forward_reference(x)
    assert out.shape == (6, min(groups, 8), 36)
    assert rel_err(out.sum(1), ref.double()) < TOL[torch.float32]


def test_masked_path_routes_like_the_fused_router():
    """Tokens whose top-a differs between the masked path and the fused router would show as a
    large error: compare token by token, with the router's own choice run through the loop."""
    mod = _biased(_moe(a=2, shared=20, router="linear"), seed=3)
    with torch.no_grad():
        mod.router.scale.copy_(torch.linspace(-0.5, 0.5, 5))  # weights 1 + p v differ from 1
        x = torch.randn(33, 36, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        idx, w, _ = te.fused_route(mod.router, x)
        ref = oracle(x, idx, w, mod.experts.gate_up_proj, mod.experts.down_proj, "silu")
        ref += shared_oracle(x, mod.shared_gate_up.weight, mod.shared_down.weight, "silu")
        out = _masked(mod, x, {**te.masked_config(33), "bt": 16}).sum(1).double()
    assert ((out - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-4


@pytest.mark.parametrize("op", ["triton_gemv_op", "triton_masked_op", "triton_dense_op"])
def test_whole_layer_op_fake_matches_real(op):
    mod = _moe(shared=30)
    x = torch.randn(7, 36).to(DEVICE)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in te.layer_args(mod))
    torch.library.opcheck(getattr(te, op), (x, *args), test_utils=("test_schema", "test_faketensor"))


def test_masked_path_compiles_fullgraph():
    mod = _moe(shared=20)
    x = torch.randn(9, 36).to(DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        f = torch.compile(lambda t: te.masked_moe(mod, t), fullgraph=True,
                          backend="aot_eager" if DEVICE == "cpu" else "inductor")
        torch.testing.assert_close(f(x), mod.forward_reference(x), atol=1e-4, rtol=1e-4)


def test_masked_path_is_chosen_where_few_weights_go_unused():
    """The rule of ``use_masked``: every expert (nearly) always touched -> masked; a batch that
    leaves many experts unused, one token, or very many tokens -> the other paths."""
    assert te.use_masked(8, 3, 3, 5)  # S3A3E8 at batch 8: 0.4^8 of each expert unused
    assert te.use_masked(32, 1, 1, 7)  # S1A1E8 at batch 32
    assert not te.use_masked(4, 1, 1, 7)  # S1A1E8 at batch 4: about 3 of 7 experts unused
    assert not te.use_masked(1, 3, 3, 5)
    assert not te.use_masked(te.MASKED_MAX_TOKENS + 1, 3, 3, 5)
    assert not te.use_masked(16, 0, 3, 5)
    mod = _moe(shared=20)
    assert te.masked_moe(mod, torch.randn(1, 36, device=DEVICE)) is None  # one token: the GEMV path


def test_dense_path_is_chosen_for_large_batches_of_mostly_active_layers(monkeypatch):
    """``use_dense``: from DENSE_MIN_TOKENS, while tokens x (all / active neurons) stays under
    DENSE_MAX_WORK; the registered op then gives the dense path's result (odd token count, two
    experts that no token chose, an activation alias)."""
    assert te.use_dense(256, 3, 4) and not te.use_dense(256, 1, 2) and not te.use_dense(256, 1, 4)  # S3A3E8, S2A2E8, S1A1E8
    assert te.use_dense(128, 3, 4) and te.use_dense(128, 1, 2) and not te.use_dense(128, 1, 4)  # batch 128
    assert not te.use_dense(te.DENSE_MIN_TOKENS - 1, 3, 4) and not te.use_dense(te.DENSE_MAX_WORK + 1, 1, 1)
    monkeypatch.setattr(te, "DENSE_MIN_TOKENS", 60)
    T = 71
    x, idx, w, gu, dn = problem(T, 2, 4, seed=11, empty=2)
    sgu, sd = _shared(20, seed=11)
    assert te.use_dense(T, 20 + 2 * 20, 20 + 4 * 20)
    out = experts.run_experts("triton", x, idx, w, gu, dn, "swish", shared=(sgu, sd))
    ref = oracle(x, idx, w, gu, dn, "silu") + shared_oracle(x, sgu, sd, "silu")
    assert rel_err(out, ref) < TOL[torch.float32]


def _dense_layer(mod, x):
    return te.triton_dense_op(x, *te.layer_args(mod))


def _gemv_layer(mod, x):
    return te.triton_gemv_op(x, *te.layer_args(mod))


LAYER_OPS = {"dense": _dense_layer, "gemv": _gemv_layer}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,T,a,shared,router", [
    ("dense", 1, 2, 20, "analytical"), ("dense", 3, 1, 30, "linear"), ("dense", 17, 3, 0, "analytical"),
    ("dense", 70, 2, 45, "linear"),
    ("gemv", 1, 2, 20, "analytical"), ("gemv", 1, 1, 45, "linear"), ("gemv", 2, 2, 30, "analytical"),
    ("gemv", 1, 3, 0, "linear"),
])
def test_whole_layer_op_matches_reference(op, T, a, shared, router, dtype):
    """The dense path's op (router, shared expert and every routed expert, the routing as a mask)
    and the GEMV path's (the router beside the shared pieces' gate/up, then the chosen experts)
    against the loop oracle: one token, odd counts, a partial last shared piece (45, 30) or none,
    both routers, routing weights 1 + p v other than 1, two experts that no token chooses (router
    bias), every activation."""
    for act in ACTS:
        mod = _moe(dtype, act=act, a=a, shared=shared, router=router)
        mod.router.bias[-2:] = -10.0  # p + b is below every other expert's: never chosen
        with torch.no_grad():
            mod.router.scale.copy_(torch.linspace(-0.5, 0.5, 5))
            x = torch.randn(T, 36, generator=torch.Generator().manual_seed(T + a)).to(DEVICE, dtype)
            out = LAYER_OPS[op](mod, x)
            idx, w, _ = te.fused_route(mod.router, x)  # the routing as the op computes it (ties broken alike)
            assert not (idx >= mod.spec.num_experts - 2).any()
            ref = oracle(x, idx, w, mod.experts.gate_up_proj, mod.experts.down_proj, act)
            if shared:
                ref = ref + shared_oracle(x, mod.shared_gate_up.weight, mod.shared_down.weight, act)
        assert out.shape == (T, 36) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], act


def test_dense_layer_path_is_taken_where_the_rule_says(monkeypatch):
    """``layer_forward``: the masked path up to its limit, then the dense path's op (layers with half
    or more of their neurons active), else None (the other paths)."""
    monkeypatch.setattr(te, "DENSE_MIN_TOKENS", 60)
    x = torch.randn(70, 36).to(DEVICE)
    half = _moe(a=2, shared=20)  # 60 of 120 neurons active
    quarter = _moe(a=1, shared=10)  # 30 of 110
    with torch.no_grad():
        assert te.dense_moe(half, x[:59]) is None and te.dense_moe(quarter, x) is None
        out = te.layer_forward(half, x)
        torch.testing.assert_close(out, _dense_layer(half, x))
        torch.testing.assert_close(out, half.forward_reference(x), atol=1e-4, rtol=1e-4)
        assert te.layer_forward(quarter, x) is None
        torch.testing.assert_close(te.layer_forward(half, x[:9]), te.masked_moe(half, x[:9]))
        half.collect_load = True  # the routing asked for: the same GEMMs as torch ops
        torch.testing.assert_close(half(x), out, atol=1e-4, rtol=1e-4)
        assert half.expert_load.sum() == 70 * 2


@pytest.mark.skipif(DEVICE != "cuda", reason="the second stream exists on CUDA only")
def test_dense_layer_op_beside_in_a_cuda_graph(monkeypatch):
    """Work on the second stream (the router and the shared expert): same output as in order,
    also replayed from a CUDA graph."""
    mod = _moe(torch.bfloat16, a=2, shared=30)
    x = torch.randn(131, 36, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(te, "SHARED_STREAM", False)
        in_order = _dense_layer(mod, x)
        monkeypatch.setattr(te, "SHARED_STREAM", True)
        assert torch.equal(_dense_layer(mod, x), in_order)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _dense_layer(mod, x)
        x.mul_(-1)
        g.replay()
        monkeypatch.setattr(te, "SHARED_STREAM", False)
        assert torch.equal(out, _dense_layer(mod, x))


def test_gemv_layer_op_sets_its_flags_back():
    """The GEMV op's launch synchronises on two flags kept across calls (``_gemv_sync``); the down
    kernel sets them back to 0, so that calls in a row (two layers, the next step) route afresh:
    each call equals the loop oracle with its own routing, and the flags end at 0. d = 600 gives
    the router three programs (slices of 256 columns), so the last one to finish sums them. More
    than 16 tokens (one tile of the router's programs) is refused."""
    mods = [_moe(a=2, shared=30, router=r, hidden=600) for r in ("analytical", "linear")]
    assert te._route_slices(600)[2] == 3
    with torch.no_grad():
        for i in range(4):
            mod = mods[i % 2]
            x = torch.randn(2, 600, generator=torch.Generator().manual_seed(i)).to(DEVICE)
            out = _gemv_layer(mod, x)
            idx, w, _ = te.fused_route(mod.router, x)
            ref = oracle(x, idx, w, mod.experts.gate_up_proj, mod.experts.down_proj, "silu")
            ref += shared_oracle(x, mod.shared_gate_up.weight, mod.shared_down.weight, "silu")
            assert rel_err(out, ref) < TOL[torch.float32], i
            assert te._gemv_sync(x).tolist() == [0, 0]
        with pytest.raises(ValueError, match="at most 16 tokens"):
            _gemv_layer(mods[0], torch.randn(17, 600).to(DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs exist on CUDA only")
def test_gemv_layer_op_in_a_cuda_graph():
    """The GEMV op (routed programs wait on the device for the router's) captured in a CUDA graph
    with two layers, replayed on new inputs: each replay equals the op run eagerly."""
    mods = [_moe(torch.bfloat16, a=1, shared=30), _moe(torch.bfloat16, a=2, shared=20, router="linear")]
    x = torch.randn(1, 36, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        _gemv_layer(mods[1], _gemv_layer(mods[0], x))  # warm-up: compile the kernels outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _gemv_layer(mods[1], _gemv_layer(mods[0], x))
        for seed in range(3):
            x.copy_(torch.randn(1, 36, generator=torch.Generator().manual_seed(seed)))
            g.replay()
            assert torch.equal(out, _gemv_layer(mods[1], _gemv_layer(mods[0], x))), seed


# ----------------------------------------------------------------------------- GEMV path (the whole layer)
def test_gemv_layer_path_is_taken_where_the_rule_says(monkeypatch):
    """``layer_forward``: the GEMV path's op while tokens x top_k is at most GEMV_MAX_PAIRS in
    layers with a shared expert, and not with GEMV_LAYER_OP off (route and experts as two ops)."""
    mod = _moe(a=2, shared=20)
    x = torch.randn(3, 36).to(DEVICE)
    with torch.no_grad():
        out = te.layer_forward(mod, x[:2])  # 4 pairs
        torch.testing.assert_close(out, _gemv_layer(mod, x[:2]))
        torch.testing.assert_close(out, mod.forward_reference(x[:2]), atol=1e-4, rtol=1e-4)
        assert te.gemv_moe(mod, x) is None  # 6 pairs: the few-token path
        assert te.gemv_moe(_moe(a=2, shared=0), x[:1]) is None  # no shared expert: route, then experts
        monkeypatch.setattr(te, "GEMV_LAYER_OP", False)
        assert te.gemv_moe(mod, x[:1]) is None
        torch.testing.assert_close(mod(x[:1]), mod.forward_reference(x[:1]), atol=1e-4, rtol=1e-4)  # route, then experts


# ----------------------------------------------------------------------------- grouped_mm path (prefill)
@pytest.mark.parametrize("T,a,E", [(1, 1, 4), (1, 3, 5), (37, 3, 6), (70, 2, 9)])
def test_grouped_mm_path_matches_loop(T, a, E):
    """torch._grouped_mm for the routed experts, our kernels for the glue: one token (most experts
    unused), odd counts, experts that receive no token, every activation."""
    for act in ACTS:
        x, idx, w, gu, dn = problem(T, a, E, d=48, m=24, dtype=torch.bfloat16, seed=T + a, empty=2 if E > 4 else 1)
        out = te._grouped_mm_experts(x, idx, w.float(), gu, dn, act)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, oracle(x, idx, w, gu, dn, act)) < TOL[torch.bfloat16]


def _prefill_sizes(monkeypatch, tokens: int) -> None:
    """Small stand-ins for prefill: the grouped_mm path (and cuBLAS for the shared expert) from ``tokens``."""
    monkeypatch.setattr(te, "SHARED_FOLD_MAX_TOKENS", tokens - 1)
    monkeypatch.setattr(te, "GROUPED_MM_MIN_ROWS", 1)


def test_grouped_mm_path_in_the_op_adds_the_shared_expert(monkeypatch):
    _prefill_sizes(monkeypatch, 20)
    x, idx, w, gu, dn = problem(23, 2, 7, d=48, m=24, dtype=torch.bfloat16, seed=12, empty=2)
    sgu, sd = _shared(30, d=48, dtype=torch.bfloat16, seed=12)
    assert te._plan(23, 2, 30, 24, 7, te.grouped_mm_ok(x, 48, 24)) == ("grouped_mm", 0)
    y = te.triton_experts_op(x, idx, w, gu, dn, "gelu_tanh", sgu, sd)
    assert y.shape == (23, 1, 48)  # one output per token: the op sums the slots itself
    ref = oracle(x, idx, w, gu, dn, "gelu_tanh") + shared_oracle(x, sgu, sd, "gelu_tanh")
    assert rel_err(experts.run_experts("triton", x, idx, w, gu, dn, "gelu_tanh", shared=(sgu, sd)), ref) < TOL[torch.bfloat16]
    torch.library.opcheck(te.triton_experts_op, (x, idx, w, gu, dn, "gelu_tanh", sgu, sd),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("ms", [30, 0], ids=["shared", "no-shared"])
def test_grouped_mm_rows_op_gives_each_pairs_row(monkeypatch, ms):
    """The grouped_mm path without its sum: each pair's unweighted row at ``pos``, and the shared
    expert's output ([0, d] without one); the op's fake matches."""
    _prefill_sizes(monkeypatch, 20)
    x, idx, w, gu, dn = problem(23, 2, 7, d=48, m=24, dtype=torch.bfloat16, seed=15, empty=2)
    sgu, sd = _shared(ms, d=48, dtype=torch.bfloat16, seed=15)
    rows, pos, extra = te.grouped_mm_rows_op(x, idx, gu, dn, "silu", sgu, sd)
    assert rows.shape == (46, 48) and pos.shape == (23, 2) and pos.dtype == torch.int64
    assert sorted(pos.flatten().tolist()) == list(range(46))  # every row belongs to one pair
    for k in range(2):
        ref = oracle(x, idx[:, k:k + 1], torch.ones(23, 1, device=DEVICE), gu, dn, "silu")  # slot k's expert, weight 1
        assert rel_err(rows[pos[:, k]], ref) < TOL[torch.bfloat16]
    if ms:
        assert torch.equal(extra, te.dense_expert(x, sgu, sd, "silu"))
    else:
        assert extra.shape == (0, 48)
    torch.library.opcheck(te.grouped_mm_rows_op, (x, idx, gu, dn, "silu", sgu, sd), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("a", [2, 3])
def test_grouped_mm_rows_summed_in_a_compiled_model(monkeypatch, a):
    """GMM_ROWS_MAX_SLOTS: compiled, for top-k up to it, the grouped_mm path's rows are summed in
    torch ops (for inductor to fuse); the same function as the op's own sum, which runs eagerly and
    for larger top-k."""
    _prefill_sizes(monkeypatch, 20)
    monkeypatch.setattr(te, "GMM_ROWS_MAX_SLOTS", 2)
    x, idx, w, gu, dn = problem(23, a, 7, d=48, m=24, dtype=torch.bfloat16, seed=16, empty=2)
    sgu, sd = _shared(30, d=48, dtype=torch.bfloat16, seed=16)
    calls = []
    real = te._gmm_rows_sum
    monkeypatch.setattr(te, "_gmm_rows_sum", lambda *args: calls.append(1) or real(*args))

    def ffn(x):
        return experts.run_experts("triton", x, idx, w, gu, dn, "silu", shared=(sgu, sd))

    eager = ffn(x)
    assert not calls  # eagerly: the op's own pass
    torch._dynamo.reset()
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")(x)
    assert bool(calls) == (a <= 2)  # traced through the rows op up to GMM_ROWS_MAX_SLOTS slots
    ref = oracle(x, idx, w, gu, dn, "silu") + shared_oracle(x, sgu, sd, "silu")
    assert rel_err(compiled, ref) < TOL[torch.bfloat16] and rel_err(compiled, eager) < 1e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="the second stream exists on CUDA only")
@pytest.mark.parametrize("gmm,a", [(True, 2), (False, 2), (False, 1)], ids=["grouped_mm", "grouped", "grouped-one-slot"])
def test_shared_expert_beside_the_routed_path_in_a_cuda_graph(monkeypatch, gmm, a):
    """Prefill sizes: the shared expert runs on a second stream; same output as in order, also
    replayed from a CUDA graph (the second stream forks from and joins the captured one)."""
    _prefill_sizes(monkeypatch, 20)
    if not gmm:
        monkeypatch.setattr(te, "GROUPED_MM_MIN_ROWS", 10**9)
    x, idx, w, gu, dn = problem(300, a, 7, d=64, m=32, dtype=torch.bfloat16, seed=14, empty=1)
    sgu, sd = _shared(40, d=64, dtype=torch.bfloat16, seed=14)
    assert te._plan(300, a, 40, 32, 7, te.grouped_mm_ok(x, 64, 32))[0] == ("grouped_mm" if gmm else "grouped")
    monkeypatch.setattr(te, "SHARED_STREAM", False)
    in_order = te.triton_experts_op(x, idx, w, gu, dn, "silu", sgu, sd)
    monkeypatch.setattr(te, "SHARED_STREAM", True)
    assert torch.equal(te.triton_experts_op(x, idx, w, gu, dn, "silu", sgu, sd), in_order)
    ref = oracle(x, idx, w, gu, dn, "silu") + shared_oracle(x, sgu, sd, "silu")
    assert in_order.shape[1] == (1 if gmm else 1 + a)  # the grouped path: the shared expert's slot, then the routed ones
    assert rel_err(in_order.float().sum(1), ref) < TOL[torch.bfloat16]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = te.triton_experts_op(x, idx, w, gu, dn, "silu", sgu, sd)
    x.mul_(-1)  # new input in place; the replay must see it
    g.replay()
    monkeypatch.setattr(te, "SHARED_STREAM", False)
    assert torch.equal(out, te.triton_experts_op(x, idx, w, gu, dn, "silu", sgu, sd))


def test_grouped_mm_path_only_where_the_gemm_serves(monkeypatch):
    """bf16 with 16-byte aligned rows only; float32 and odd widths keep the Triton grouped kernels."""
    _prefill_sizes(monkeypatch, 20)
    x = torch.zeros(2, 48, device=DEVICE, dtype=torch.bfloat16)
    assert te.grouped_mm_ok(x, 48, 24)
    assert not te.grouped_mm_ok(x.float(), 48, 24) and not te.grouped_mm_ok(x, 36, 24) and not te.grouped_mm_ok(x, 48, 20)
    assert te._plan(19, 2, 30, 24, 7, True)[0] == "grouped" and te._plan(20, 2, 0, 24, 7, False)[0] == "grouped"
    monkeypatch.setattr(te, "GROUPED_MM_MIN_ROWS", 640)
    assert te._plan(2048, 3, 30, 24, 5, True)[0] == "grouped_mm" and te._plan(2048, 1, 30, 24, 7, True)[0] == "grouped"
    x, idx, w, gu, dn = problem(23, 2, 7, d=36, m=20, dtype=torch.bfloat16, seed=13)  # unaligned: Triton kernels,
    y = te.triton_experts_op(x, idx, w, gu, dn, "silu")  # one slot per routed expert, summed by the caller
    assert y.shape == (23, 2, 36) and rel_err(y.float().sum(1), oracle(x, idx, w, gu, dn, "silu")) < TOL[torch.bfloat16]

