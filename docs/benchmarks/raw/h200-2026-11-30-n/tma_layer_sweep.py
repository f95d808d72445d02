"""Prototype: grouped expert GEMMs with the weights (and optionally A) loaded through TMA descriptors.
Times them against the current Triton grouped kernels and torch._grouped_mm at prefill sizes."""
import sys, itertools, time
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from cmoe import triton_experts as te

@triton.jit
def _gu_tma(x_ptr, w_desc, h_ptr, sorted_ptr, tile_expert_ptr, P, d, m, num_tiles,
            A: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            GROUP: tl.constexpr, XDESC: tl.constexpr, x_desc=None):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(m, BN)
    in_group = GROUP * n_blocks
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_tiles - first, GROUP)
    tile = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    tok = (pair // A).to(tl.int64)
    n0 = pid_n * BN
    wrow = e * 2 * m + n0
    acc_g = tl.zeros((BT, BN), tl.float32)
    acc_u = tl.zeros((BT, BN), tl.float32)
    for k0 in range(0, d, BK):
        if XDESC:
            xk = x_desc.load([tile * BT, k0])
        else:
            offs_k = k0 + tl.arange(0, BK)
            xk = tl.load(x_ptr + tok[:, None] * d + offs_k[None, :], mask=valid[:, None], other=0.0)
        bg = w_desc.load([wrow, k0])
        bu = w_desc.load([wrow + m, k0])
        acc_g = tl.dot(xk, bg.T, acc_g)
        acc_u = tl.dot(xk, bu.T, acc_u)
    hv = te._act(acc_g, ACT) * acc_u
    offs_n = n0 + tl.arange(0, BN)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * m + offs_n[None, :], hv.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n < m)[None, :])


@triton.jit
def _down_tma(h_desc, wd_desc, wt_ptr, y_ptr, sorted_ptr, tile_expert_ptr, P, d, m, num_tiles,
              A: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(d, BN)
    in_group = GROUP * n_blocks
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_tiles - first, GROUP)
    tile = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows = tile * BT + tl.arange(0, BT)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < P
    n0 = pid_n * BN
    acc = tl.zeros((BT, BN), tl.float32)
    for k0 in range(0, m, BK):
        hk = h_desc.load([tile * BT, k0])
        bd = wd_desc.load([e * d + n0, k0])
        acc = tl.dot(hk, bd.T, acc)
    rw = tl.load(wt_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # weight of pair (t, k) at t * A + k
    acc = acc * rw[:, None]
    offs_n = n0 + tl.arange(0, BN)
    tl.store(y_ptr + pair[:, None].to(tl.int64) * d + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n < d)[None, :])


def tma_experts(x, idx, weight, gate_up, down, act, cfg):
    T, a = idx.shape
    d = x.shape[1]
    E, m = down.shape[0], down.shape[2]
    P = T * a
    bt = cfg["bt"]
    sorted_ids, tile_expert = te.align(idx, E, bt, 0)
    num_tiles = tile_expert.numel()
    h = torch.empty(num_tiles * bt, m, device=x.device, dtype=x.dtype)
    bn, bk, nw, ns = cfg["gate_up"]
    gm = cfg.get("group", 8)
    w_desc = TensorDescriptor.from_tensor(gate_up.view(E * 2 * m, d), [bn, bk])
    xdesc = cfg.get("xdesc", False)
    if xdesc:  # A gathered into tile order first, then read through TMA
        tok = torch.where((sorted_ids >= 0) & (sorted_ids < P), sorted_ids // a, 0).long()
        xs = x.index_select(0, tok)
        x_desc = TensorDescriptor.from_tensor(xs, [bt, bk])
    else:
        x_desc = None
    _gu_tma[(num_tiles * triton.cdiv(m, bn),)](x, w_desc, h, sorted_ids, tile_expert, P, d, m, num_tiles,
        A=a, ACT=te._ACT_CODE[act], BT=bt, BN=bn, BK=bk, GROUP=gm, XDESC=xdesc, x_desc=x_desc, num_warps=nw, num_stages=ns)
    y = torch.empty(P, d, device=x.device, dtype=x.dtype)
    bn, bk, nw, ns = cfg["down"]
    h_desc = TensorDescriptor.from_tensor(h, [bt, bk])
    wd_desc = TensorDescriptor.from_tensor(down.view(E * d, m), [bn, bk])
    _down_tma[(num_tiles * triton.cdiv(d, bn),)](h_desc, wd_desc, weight, y, sorted_ids, tile_expert, P, d, m, num_tiles,
        A=a, BT=bt, BN=bn, BK=bk, GROUP=gm, num_warps=nw, num_stages=ns)
    return y.view(T, a, d)


def main():
    if not torch.cuda.is_available():  # CPU interpreter check of correctness on a small shape
        torch.manual_seed(0)
        T, d, m, E, a = 37, 64, 48, 5, 2
        x = torch.randn(T, d) * 0.5
        gu = torch.randn(E, 2 * m, d) * 0.1
        dn = torch.randn(E, d, m) * 0.1
        idx = torch.stack([torch.randperm(E)[:a] for _ in range(T)]).int()
        idx[:, 0] = torch.where(idx[:, 0] == 4, 3, idx[:, 0]); idx[:, 1] = torch.where(idx[:, 1] == 4, torch.where(idx[:,0]==0,1,0), idx[:, 1])  # expert 4 gets nothing
        w = torch.rand(T, a)
        from cmoe.experts import loop_experts
        ref = loop_experts(x, idx.long(), w, gu, dn, "silu")
        for xdesc in (False, True):
            out = tma_experts(x, idx, w, gu, dn, "silu", dict(bt=16, gate_up=(16, 16, 4, 2), down=(16, 16, 4, 2), xdesc=xdesc)).sum(1)
            print("xdesc", xdesc, "rel err", ((out - ref).norm() / ref.norm()).item())
        return
    sys.path.insert(0, "benchmarks")
    from bench_experts import make_moe, graph_ms, SHAPES
    cands = [
        dict(bt=128, gate_up=(128, 64, 8, 4), down=(256, 64, 8, 4)),
        dict(bt=128, gate_up=(128, 64, 8, 3), down=(256, 64, 8, 3)),
        dict(bt=128, gate_up=(128, 64, 8, 4), down=(128, 64, 8, 4)),
        dict(bt=128, gate_up=(64, 64, 8, 4), down=(128, 64, 8, 4)),
        dict(bt=64, gate_up=(128, 64, 4, 4), down=(256, 64, 8, 4)),
        dict(bt=64, gate_up=(128, 64, 8, 4), down=(256, 64, 8, 4)),
        dict(bt=64, gate_up=(256, 64, 8, 3), down=(256, 64, 8, 4)),
        dict(bt=128, gate_up=(128, 128, 8, 3), down=(256, 128, 8, 3)),
    ]
    copies = 4
    for shape in ("llama2-7b", "llama3-8b"):
        d, f = SHAPES[shape]
        for preset in sys.argv[1:] or ["S1A1E8", "S2A2E16", "S2A2E8", "S3A3E8"]:
            layers = [make_moe(d, f, preset) for _ in range(copies)]
            s = layers[0].spec
            for T in (2048, 16384):
                x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    idx, w, _ = te.fused_route(layers[0].router, x)
                    w = w.float().contiguous()
                    L0 = layers[0].experts
                    ref = te._grouped_experts(x, idx, w, L0.gate_up_proj, L0.down_proj, "silu").sum(1).float()
                    flops = 2 * T * s.top_k * 3 * d * s.expert_size

                    def t_of(fn):
                        def run():
                            for lay in layers:
                                fn(lay)
                        return graph_ms(run) / copies * 1e3

                    def report(name, call):
                        try:
                            out = call(layers[0]).float()
                            err = ((out - ref).norm() / ref.norm()).item()
                            t = t_of(call)
                            print(f"{shape} {preset} T={T} {name:70s} {t:8.1f} us {flops / t / 1e6:6.1f} TFLOP/s err {err:.1e}", flush=True)
                        except Exception as ex:
                            print(f"{shape} {preset} T={T} {name} FAIL {type(ex).__name__} {str(ex)[:300]}", flush=True)

                    cur = te.grouped_config(T * s.top_k)
                    report(f"triton grouped {cur}", lambda lay: te._grouped_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu", cur).sum(1))
                    report("grouped_mm", lambda lay: te._grouped_mm_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu"))
                    for cfg in cands:
                        for xd in (False, True):
                            c = dict(cfg, xdesc=xd)
                            report(f"tma {c}", lambda lay, c=c: tma_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu", c).sum(1))
            del layers
            torch.cuda.empty_cache()

main()
