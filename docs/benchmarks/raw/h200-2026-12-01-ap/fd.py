"""Session 37 prototype: the dense path in two Triton launches (the router inside the gate/up launch).

- ``_fd_gate_up``: programs 0 .. R-1 compute the router's partial scores over slices of d (token
  tiles x slices); the last slice of a token tile (a ticket) sums them and writes each token's
  weight for each routed expert (0 where not chosen) into ``coef [T, E]``, then counts the tile
  done. The other programs multiply a tile of tokens by a block of neurons (shared pieces and
  routed experts alike, gate and up as one product over interleaved rows), apply the activation,
  and, for routed neurons, wait on the device until every router tile is done and scale by coef.
- ``_fd_down``: h [T, (S+E) m] (already weighted) through the down projections, K groups of
  virtual experts, one output slot per group ([T, K, d], summed by the caller); program 0 sets the
  flags back to 0.
"""
import torch
import triton
import triton.language as tl

import cmoe.triton_experts as te
from cmoe.triton_experts import _act, _down_block, _down_rows, _matmul_paired, _route_partial, _route_weights


@triton.jit
def _fd_gate_up(
    x_ptr, w_ptr, sw_ptr, h_ptr,  # x [T, d]; gate_up [E, 2m, d]; shared [2ms, d]; h [T, (S+E) m]
    rg_ptr, ru_ptr, bias_ptr, scale_ptr, coef_ptr, part_ptr, sync_ptr,  # router; coef [T, E] f32; sync [RT + 1] i32
    T, d, m, ms, E, KPER, rows_pad, RT, TT,
    A: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLITS: tl.constexpr, RBT: tl.constexpr, BE: tl.constexpr, RBK: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, R_IEEE: tl.constexpr, LINEAR: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < RT * SPLITS:
        rtile = pid // SPLITS
        _route_partial(x_ptr, rg_ptr, ru_ptr, part_ptr, rtile, pid % SPLITS, T, d, rows_pad, E, KPER,
                       RBT, BE, RBK, UPCAST, R_IEEE, LINEAR)
        tl.debug_barrier()  # the partial scores stored before the ticket (release)
        if tl.atomic_add(sync_ptr + rtile, 1) == SPLITS - 1:
            rows = rtile * RBT + tl.arange(0, RBT)
            r_ok = rows < T
            offs_e = tl.arange(0, BE)
            e_ok = offs_e < E
            g = tl.zeros((RBT, BE), tl.float32)
            u = tl.zeros((RBT, BE), tl.float32)
            ptr = part_ptr + rows[:, None] * BE + offs_e[None, :]
            for sp in range(SPLITS):  # fixed order: deterministic
                g += tl.load(ptr + sp * 2 * rows_pad * BE, cache_modifier=".cg")
                if not LINEAR:
                    u += tl.load(ptr + sp * 2 * rows_pad * BE + rows_pad * BE, cache_modifier=".cg")
            coef, chosen = _route_weights(g, u, offs_e, e_ok, bias_ptr, scale_ptr, A, ACT, BE, LINEAR)
            tl.store(coef_ptr + rows[:, None] * E + offs_e[None, :], coef, mask=r_ok[:, None] & e_ok[None, :])
            tl.debug_barrier()
            tl.atomic_add(sync_ptr + RT, 1)  # one more router tile done
        return
    q = pid - RT * SPLITS
    tile = q % TT  # fastest-varying: the token tiles that read the same weights run together
    pid_n = q // TT
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    j = tl.arange(0, 2 * BN)
    n2 = pid_n * BN + j // 2  # neuron of column j: gate row at even j, up row at odd j
    v2 = n2 // m
    i2 = n2 % m
    shared2 = v2 < S
    row2 = tl.where(shared2, v2 * m + i2 + (j % 2) * ms, (v2 - S) * (2 * m) + i2 + (j % 2) * m).to(tl.int64)
    ok2 = tl.where(shared2, v2 * m + i2 < ms, v2 < S + E)
    w2 = tl.where(shared2, sw_ptr, w_ptr) + row2 * d
    g, u = _matmul_paired(x_ptr, rows.to(tl.int64), r_ok, w2, ok2, d, BT, BN, BK, UPCAST, IEEE, EVEN_K)
    hv = _act(g, ACT) * u
    n = pid_n * BN + tl.arange(0, BN)
    v = n // m
    n_ok = v < S + E
    if (pid_n * BN + BN - 1) // m >= S:  # routed neurons in this block: wait for the routing
        while tl.load(sync_ptr + RT, volatile=True) < RT:
            pass
        tl.atomic_add(sync_ptr + RT, 0)  # acquire
        routed = (v >= S) & n_ok
        c = tl.load(coef_ptr + rows[:, None] * E + (v - S)[None, :], mask=r_ok[:, None] & routed[None, :], other=1.0,
                    cache_modifier=".cg")
        hv = hv * c
    tl.store(h_ptr + rows[:, None].to(tl.int64) * ((S + E) * m) + n[None, :], hv.to(h_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _fd_down(
    h_ptr, w_ptr, sd_ptr, out_ptr, sync_ptr,  # h [T, (S+E) m]; down [E, d, m]; shared_down [d, ms]; out [T, K, d]
    T, d, m, ms, E, GS, TT, NSYNC,
    S: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid == 0:  # the gate/up launch before has finished (stream order): its flags back to 0
        offs = tl.arange(0, 64)
        tl.store(sync_ptr + offs, tl.zeros((64,), tl.int32), mask=offs < NSYNC)
    tile = pid % TT
    rest = pid // TT
    grp = rest % K
    pid_n = rest // K
    rows = tile * BT + tl.arange(0, BT)
    r_ok = rows < T
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < d
    acc = tl.zeros((BT, BN), tl.float32)
    for v in range(grp * GS, tl.minimum(grp * GS + GS, S + E)):
        wd, k_end = _down_rows(w_ptr, sd_ptr, v, offs_n, d, m, ms, S)
        h_rows = h_ptr + rows.to(tl.int64) * ((S + E) * m) + v * m
        acc = _down_block(acc, h_rows, r_ok, wd, n_ok, m, k_end, BK, UPCAST, IEEE, "evict_first")
    out = out_ptr + (rows[:, None].to(tl.int64) * K + grp) * d + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


DEFAULT = dict(bt=128, gate_up=(64, 64, 8, 4), down=(64, 128, 4, 4), groups=4, route=(32, 512))


def fd_moe(x, gate_up, down, sgu, sd, rg, ru, bias, scale, linear, act, top_k, cfg=None, only=None):
    """[T, K, d]: the whole layer in two launches; sum over K is the output. ``only``: "gate_up" (h)
    or a precomputed h to run the down launch alone."""
    cfg = {**DEFAULT, **(cfg or {})}
    T, d = x.shape
    E, m = down.shape[0], down.shape[2]
    ms, S, sgu, sd = te._shared_pieces((sgu, sd) if sd is not None else None, gate_up, down)
    x, gate_up, down, rg, ru = x.contiguous(), gate_up.contiguous(), down.contiguous(), rg.contiguous(), ru.contiguous()
    rbt, split_k = cfg["route"]
    RT = triton.cdiv(T, rbt)
    rbk, kper, splits = te._route_slices(d, split_k)
    be = max(16, triton.next_power_of_2(E))
    part = torch.empty(splits, 2, RT * rbt, be, device=x.device, dtype=torch.float32)
    coef = torch.empty(T, E, device=x.device, dtype=torch.float32)
    sync = te.stream_flags("fd_moe", 64, x.device)
    assert RT + 1 <= 64
    h = torch.empty(T, (S + E) * m, device=x.device, dtype=x.dtype)
    ieee = x.dtype == torch.float32
    r_ieee = te._router_ieee(x, rg)
    upcast = te._INTERPRET and not ieee
    code = te._ACT_CODE[act]
    bt = cfg["bt"]
    TT = triton.cdiv(T, bt)
    bn, bk, nw, ns = cfg["gate_up"]
    if isinstance(only, torch.Tensor):
        h = only
    else:
      grid = (RT * splits + TT * triton.cdiv((S + E) * m, bn),)
      _fd_gate_up[grid](
        x, gate_up, sgu, h, rg, ru, bias, scale, coef, part, sync, T, d, m, ms, E, kper, RT * rbt, RT, TT,
        A=top_k, S=S, ACT=code, BT=bt, BN=bn, BK=bk, SPLITS=splits, RBT=rbt, BE=be, RBK=rbk,
        UPCAST=upcast, IEEE=ieee, R_IEEE=r_ieee, LINEAR=linear, EVEN_K=d % bk == 0, num_warps=nw, num_stages=ns,
      )
      if only == "gate_up":
        return h
    K, gs = te._expert_groups(S, E, cfg["groups"])
    out = torch.empty(T, K, d, device=x.device, dtype=x.dtype)
    bn, bk, nw, ns = cfg["down"]
    _fd_down[(TT * K * triton.cdiv(d, bn),)](
        h, down, sd, out, sync, T, d, m, ms, E, gs, TT, RT + 1,
        S=S, K=K, BT=bt, BN=bn, BK=bk, UPCAST=upcast, IEEE=ieee, num_warps=nw, num_stages=ns,
    )
    return out
