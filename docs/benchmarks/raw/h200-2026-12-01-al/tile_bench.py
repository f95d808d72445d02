"""Where the routed grouped GEMMs lose against cuBLAS at 1x2048 (llama3-8b / llama2-7b, S1A1E8 shapes).

Times, one layer's routed experts at T tokens with top-1 routing over E experts (random, about
T/E rows each), each kernel alone (triton.testing.do_bench, L2 flushed between runs):
  cur      the library's _grouped_gate_up / _grouped_down (two dots per K step for gate/up)
  onedot   gate/up as one dot over a [BK, 2*BN] weight block gathered from the gate and the up rows
  plain    a plain Triton GEMM (no gather, no masks) over the padded rows, same tile
  cublas   torch.mm over the padded rows (the same FLOPs the grouped kernel computes)
  gmm      torch._grouped_mm over the sorted rows (no padding)
Rates are over the useful FLOPs (T rows), and over the computed (padded) ones.
"""
import sys
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import cmoe.triton_experts as te


@triton.jit
def _gate_up_onedot(x_ptr, w_ptr, h_ptr, sorted_ptr, tile_expert_ptr, P, d, m, num_tiles,
                    A: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                    KMASK: tl.constexpr):
    tile, pid_n = te._tile_of(tl.program_id(0), num_tiles, tl.cdiv(m, BN), GROUP)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    e = e.to(tl.int64)
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    tok = (pair // A).to(tl.int64)
    j = tl.arange(0, 2 * BN)
    n2 = pid_n * BN + (j % BN)
    wrow = e * (2 * m) + tl.where(j < BN, n2, m + n2)
    b_ptr = w_ptr + wrow * d
    n_ok2 = n2 < m
    acc = tl.zeros((BT, 2 * BN), tl.float32)
    for k0 in range(0, d, BK):
        offs_k = k0 + tl.arange(0, BK)
        if KMASK:
            k_ok = offs_k < d
            xk = tl.load(x_ptr + tok[:, None] * d + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr[None, :] + offs_k[:, None], mask=k_ok[:, None] & n_ok2[None, :], other=0.0)
        else:
            xk = tl.load(x_ptr + tok[:, None] * d + offs_k[None, :], mask=valid[:, None], other=0.0)
            b = tl.load(b_ptr[None, :] + offs_k[:, None], mask=n_ok2[None, :], other=0.0)
        acc = tl.dot(xk, b, acc)
    g, u = acc.reshape(BT, 2, BN).permute(0, 2, 1).split()
    hv = g * tl.sigmoid(g) * u
    offs_n = pid_n * BN + tl.arange(0, BN)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * m + offs_n[None, :], hv.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n < m)[None, :])


@triton.jit
def _plain_mm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """c [M, N] = a [M, K] @ b [N, K]^T, sizes multiples of the blocks."""
    pid = tl.program_id(0)
    tm, tn = te._tile_of(pid, M // BM, N // BN, GROUP)
    rm = tm * BM + tl.arange(0, BM)
    rn = tn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :])
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def bench(fn):
    return min(do_bench(fn, warmup=50, rep=300) for _ in range(2)) * 1e3  # us


def main(shape: str, T: int = 2048):
    d, f = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008)}[shape]
    E_all = 8
    m = f // E_all
    E = E_all - 1  # S1A1E8: one shared piece, 7 routed experts
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    gate_up = torch.randn(E, 2 * m, d, device=dev, dtype=torch.bfloat16) * 0.02
    down = torch.randn(E, d, m, device=dev, dtype=torch.bfloat16) * 0.02
    idx = torch.randint(0, E, (T, 1), device=dev, dtype=torch.int32)
    wt = torch.rand(T, 1, device=dev, dtype=torch.float32)
    cfg = te.grouped_config(T)
    bt = cfg["bt"]
    sorted_ids, tile_expert = te.align(idx, E, bt, 0)
    num_tiles = tile_expert.numel()
    used = int((tile_expert >= 0).sum())
    rows_c = used * bt
    useful_gu = 2 * T * d * 2 * m
    comp_gu = 2 * rows_c * d * 2 * m
    useful_dn = 2 * T * d * m
    comp_dn = 2 * rows_c * d * m
    counts = torch.bincount(idx.view(-1), minlength=E).tolist()
    print(f"## {shape} S1A1E8 T={T}: m={m}, E={E}, rows per expert {counts}, tiles used {used} of {num_tiles}, "
          f"rows computed {rows_c} ({T / rows_c:.1%} useful); cfg {cfg}")

    def line(name, us, useful, comp):
        print(f"{name:44s} {us:8.1f} us  {useful / us / 1e6:6.0f} TFLOP/s useful  {comp / us / 1e6:6.0f} computed")

    h = torch.empty(num_tiles * bt, m, device=dev, dtype=torch.bfloat16)
    bn, bk, nw, ns = cfg["gate_up"]
    gm = cfg.get("group", 8)
    sgu = gate_up  # not read (S = 0)

    def cur_gu(bn=bn, bk=bk, nw=nw, ns=ns, gm=gm):
        te._grouped_gate_up[(num_tiles * triton.cdiv(m, bn),)](
            x, gate_up, sgu, h, sorted_ids, tile_expert, T, d, m, 0, num_tiles,
            A=1, S=0, ACT=0, BT=bt, BN=bn, BK=bk, GROUP=gm, UPCAST=False, IEEE=False, num_warps=nw, num_stages=ns)

    cur_gu()
    ref_h = h.clone()
    line(f"cur gate/up {cfg['gate_up']}", bench(cur_gu), useful_gu, comp_gu)
    for g2 in (1, 4, 16):
        line(f"cur gate/up GROUP={g2}", bench(lambda: cur_gu(gm=g2)), useful_gu, comp_gu)
    line("cur gate/up stages 3", bench(lambda: cur_gu(ns=3)), useful_gu, comp_gu)

    for (obn, obk, onw, ons, kmask) in [(128, 64, 8, 4, True), (128, 64, 8, 4, False), (128, 64, 8, 3, False),
                                        (64, 64, 8, 4, False), (128, 64, 8, 5, False)]:
        def one(obn=obn, obk=obk, onw=onw, ons=ons, kmask=kmask):
            _gate_up_onedot[(num_tiles * triton.cdiv(m, obn),)](
                x, gate_up, h, sorted_ids, tile_expert, T, d, m, num_tiles,
                A=1, BT=bt, BN=obn, BK=obk, GROUP=gm, KMASK=kmask, num_warps=onw, num_stages=ons)
        try:
            h.zero_()
            one()
            ok = torch.equal(h[sorted_ids < T], ref_h[sorted_ids < T])
            err = (h[sorted_ids < T].float() - ref_h[sorted_ids < T].float()).abs().max().item()
            line(f"onedot ({obn},{obk},{onw},{ons}) kmask={kmask} eq={ok} err={err:.1e}", bench(one), useful_gu, comp_gu)
        except Exception as exc:  # noqa: BLE001
            print(f"onedot ({obn},{obk},{onw},{ons}) FAIL {type(exc).__name__} {str(exc)[:120]}")

    a = torch.randn(rows_c, d, device=dev, dtype=torch.bfloat16)
    w_all = torch.randn(2 * m, d, device=dev, dtype=torch.bfloat16)
    c = torch.empty(rows_c, 2 * m, device=dev, dtype=torch.bfloat16)
    for (pbm, pbn, pbk, pnw, pns) in [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]:
        if (2 * m) % pbn:
            continue

        def plain(pbm=pbm, pbn=pbn, pbk=pbk, pnw=pnw, pns=pns):
            _plain_mm[((rows_c // pbm) * (2 * m // pbn),)](a, w_all, c, rows_c, 2 * m, d, BM=pbm, BN=pbn, BK=pbk,
                                                            GROUP=8, num_warps=pnw, num_stages=pns)
        try:
            line(f"plain triton ({pbm},{pbn},{pbk},{pnw},{pns}) padded rows, 1 weight", bench(plain), useful_gu, comp_gu)
        except Exception as exc:  # noqa: BLE001
            print(f"plain FAIL {type(exc).__name__} {str(exc)[:120]}")
    line("cublas padded rows, 1 weight", bench(lambda: torch.mm(a, w_all.T, out=c)), useful_gu, comp_gu)
    a_t = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    line("cublas T rows, 1 weight (no padding)", bench(lambda: torch.mm(a_t, w_all.T)), useful_gu, useful_gu)
    tokens, ends, _ = te.sort_pairs(idx, E)
    xs = x[tokens.long()]
    offs = ends.to(torch.int32)
    try:
        line("grouped_mm (sorted rows, gathered before)", bench(lambda: torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)),
             useful_gu, useful_gu)
    except Exception as exc:  # noqa: BLE001
        print(f"grouped_mm FAIL {type(exc).__name__} {str(exc)[:120]}")

    # down
    y = torch.empty(T, 1, d, device=dev, dtype=torch.bfloat16)
    dbn, dbk, dnw, dns = cfg["down"]

    def cur_dn(dbn=dbn, dbk=dbk, dnw=dnw, dns=dns, gm=gm):
        te._grouped_down[(num_tiles * triton.cdiv(d, dbn),)](
            h, down, down, wt, y, sorted_ids, tile_expert, T, d, m, 0, num_tiles, 1, 0,
            A=1, S=0, BT=bt, BN=dbn, BK=dbk, GROUP=gm, UPCAST=False, IEEE=False, num_warps=dnw, num_stages=dns)
    line(f"cur down {cfg['down']}", bench(cur_dn), useful_dn, comp_dn)
    line("cur down stages 3", bench(lambda: cur_dn(dns=3)), useful_dn, comp_dn)
    line("cur down GROUP=16", bench(lambda: cur_dn(gm=16)), useful_dn, comp_dn)
    hh = torch.randn(rows_c, m, device=dev, dtype=torch.bfloat16)
    wd = torch.randn(d, m, device=dev, dtype=torch.bfloat16)
    cd = torch.empty(rows_c, d, device=dev, dtype=torch.bfloat16)
    if m % 64 == 0:
        line("plain triton down (128,256,64,8,4)", bench(lambda: _plain_mm[((rows_c // 128) * (d // 256),)](
            hh, wd, cd, rows_c, d, m, BM=128, BN=256, BK=64, GROUP=8, num_warps=8, num_stages=4)), useful_dn, comp_dn)
    line("cublas down padded rows", bench(lambda: torch.mm(hh, wd.T, out=cd)), useful_dn, comp_dn)


if __name__ == "__main__":
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for s in sys.argv[1:] or ["llama3-8b", "llama2-7b"]:
        main(s)
