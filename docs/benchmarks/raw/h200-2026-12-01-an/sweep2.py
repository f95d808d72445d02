"""Session 35, call 3: the grouped path's pieces at 1x2048, Triton vs Gluon, tiles of 128 and 64 rows
(64-row tiles pad each expert less). Each piece alone, in us; a Triton gather kernel against index_select;
the Gluon layer at bt=64 against the Triton layer's output."""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import cmoe.gluon_experts as ge
import cmoe.triton_experts as te


def bench(fn):
    return min(do_bench(fn, warmup=20, rep=150) for _ in range(2)) * 1e3


@triton.jit
def _gather(x_ptr, ids_ptr, out_ptr, T, d, A: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tok = tl.minimum(tl.maximum(tl.load(ids_ptr + r) // A, 0), T - 1).to(tl.int64)
    for c0 in range(0, d, BD):
        c = c0 + tl.arange(0, BD)
        v = tl.load(x_ptr + tok[:, None] * d + c[None, :], mask=(c < d)[None, :])
        tl.store(out_ptr + r.to(tl.int64)[:, None] * d + c[None, :], v, mask=(c < d)[None, :])


def gather_triton(x, ids, a, rows=8, bd=512, nw=4):
    out = torch.empty(ids.numel(), x.shape[1], device=x.device, dtype=x.dtype)
    _gather[(ids.numel() // rows,)](x, ids, out, x.shape[0], x.shape[1], A=a, ROWS=rows, BD=bd, num_warps=nw)
    return out


def triton_gate_up(x, gu, h, sorted_ids, tile_expert, P, a, bt, tile, paired=True):
    bn, bk, nw, ns = tile
    E, two_m, d = gu.shape
    m = two_m // 2
    nt = tile_expert.numel()
    te._grouped_gate_up[(nt * triton.cdiv(m, bn),)](
        x, gu, gu, h, sorted_ids, tile_expert, P, d, m, 0, nt, A=a, S=0, ACT=0, BT=bt, BN=bn, BK=bk, GROUP=8,
        UPCAST=False, IEEE=False, PAIRED=paired, EVEN_K=d % bk == 0, num_warps=nw, num_stages=ns)


def triton_down(h, dn, wt, y, sorted_ids, tile_expert, P, a, bt, tile):
    bn, bk, nw, ns = tile
    E, d, m = dn.shape
    nt = tile_expert.numel()
    te._grouped_down[(nt * triton.cdiv(d, bn),)](
        h, dn, dn, wt, y, sorted_ids, tile_expert, P, d, m, 0, nt, y.shape[1], 0,
        A=a, S=0, BT=bt, BN=bn, BK=bk, GROUP=8, UPCAST=False, IEEE=False, num_warps=nw, num_stages=ns)


def attempt(label, fn):
    try:
        print(f"{label} {bench(fn):7.1f} us", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"{label} FAIL {type(exc).__name__} {str(exc)[:160]}", flush=True)


GU = {128: [(128, 64, 4, 8), (128, 64, 5, 8), (64, 64, 6, 8)],
      64: [(128, 64, 4, 4), (128, 64, 5, 4), (128, 64, 4, 8), (64, 64, 6, 4), (256, 64, 3, 8)]}
DN = {128: [(256, 64, 3, 8), (128, 64, 6, 8), (256, 64, 4, 8)],
      64: [(256, 64, 4, 4), (256, 64, 5, 4), (256, 64, 4, 8), (128, 64, 6, 4), (128, 128, 4, 4)]}
TGU = {128: [(128, 64, 4, 8)], 64: [(128, 64, 4, 6), (128, 64, 4, 4), (64, 64, 4, 4)]}
TDN = {128: [(256, 64, 4, 8)], 64: [(256, 64, 4, 6), (128, 64, 4, 4), (256, 64, 8, 4)]}


def main(shape, cfg_name, T=2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    n_all, S, a = {"S1A1E8": (8, 1, 1), "S2A2E16": (16, 2, 2)}[cfg_name]
    m, E = f // n_all, n_all - S
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(E, 2 * m, d, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, d, m, device="cuda", dtype=torch.bfloat16) * 0.02
    pop = torch.exp(0.35 * torch.randn(E, device="cuda"))
    idx = torch.multinomial(pop.expand(T, E), a, replacement=False).to(torch.int32)
    wt = torch.rand(T, a, device="cuda")
    P = T * a
    print(f"## {shape} {cfg_name} T={T} m={m} E={E}", flush=True)
    te.GLUON_GROUPED = False
    ref = te._grouped_experts(x, idx, wt, gu, dn, "silu").float()
    attempt("triton layer (default)", lambda: te._grouped_experts(x, idx, wt, gu, dn, "silu"))
    attempt("align bt=128", lambda: te.align(idx, E, 128, 0))
    attempt("align bt=64", lambda: te.align(idx, E, 64, 0))
    y = torch.empty(T, a, d, device="cuda", dtype=torch.bfloat16)
    for bt in (128, 64):
        sorted_ids, tile_expert = te.align(idx, E, bt, 0)
        nt = tile_expert.numel()
        used = int((tile_expert >= 0).sum())
        print(f"# bt={bt}: {used} of {nt} tiles used, {used * bt} rows for {P} pairs", flush=True)
        h = torch.empty(nt * bt, m, device="cuda", dtype=torch.bfloat16)
        attempt(f"gather index_select bt={bt}", lambda: ge.gather_rows(x, sorted_ids, a))
        for rows, bd, nw in ((8, 512, 4), (4, 1024, 4), (16, 256, 4), (8, 1024, 8)):
            attempt(f"gather triton {rows},{bd},{nw} bt={bt}", lambda: gather_triton(x, sorted_ids, a, rows, bd, nw))
        xs = ge.gather_rows(x, sorted_ids, a)
        assert torch.equal(gather_triton(x, sorted_ids, a), xs)
        for tile in TGU[bt]:
            attempt(f"triton gate/up {tile} bt={bt}", lambda: triton_gate_up(x, gu, h, sorted_ids, tile_expert, P, a, bt, tile))
        for tile in GU[bt]:
            attempt(f"gluon gate/up {tile} bt={bt}", lambda: ge.gate_up(xs, gu, h, tile_expert, "silu", bt, tile))
        ge.gate_up(xs, gu, h, tile_expert, "silu", bt, GU[bt][0])
        for tile in TDN[bt]:
            attempt(f"triton down {tile} bt={bt}", lambda: triton_down(h, dn, wt, y, sorted_ids, tile_expert, P, a, bt, tile))
        for tile in DN[bt]:
            attempt(f"gluon down {tile} bt={bt}", lambda: ge.down(h, dn, wt, y, sorted_ids, tile_expert, P, 0, bt, tile))
        ge.down(h, dn, wt, y, sorted_ids, tile_expert, P, 0, bt, DN[bt][0])
        print(f"gluon bt={bt} vs triton layer: max diff {(y.float() - ref).abs().max().item():.2e}", flush=True)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for s in ("llama3-8b", "llama2-7b"):
        for c in ("S1A1E8", "S2A2E16"):
            main(s, c)
