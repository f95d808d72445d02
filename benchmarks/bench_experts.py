"""One FFN layer, dense vs CMoE, per implementation and token count (kernel tuning).

    python benchmarks/bench_experts.py [--shape llama2-7b] [--configs S1A1E8 ...] [--tokens 1 8 ...]

``--paths`` times the whole layer on each path (masked, dense, grouped_mm, Triton
grouped/few-token/GEMV) and on the one the layer picks; ``--masked`` also sweeps the masked
path's tiles; ``--sweep`` sweeps the expert kernels' tiles; ``--kernels`` adds a per-kernel profile.

Each timing replays a CUDA graph that runs ``--copies`` layer copies in sequence (so the
weights come from HBM, not L2) and reports the median per layer. Components (router,
routed experts, shared expert) are timed alone too, and the routed-expert paths are
checked against the loop oracle first.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

from cmoe.generation import block_time

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}


def capture(fn, iters: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``iters`` calls of ``fn`` (after two warm-up calls on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_ms(fn, iters: int = 5, reps: int = 7) -> float:
    g = capture(fn, iters)
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / iters)
    ts.sort()
    return ts[len(ts) // 2]


def event_ms(fn, reps: int = 5) -> float:
    return 1e3 * block_time(fn, reps, settle_s=0.0, block_s=0.0)  # the mean of reps calls after one untimed


def make_moe(d, f, preset, dtype=torch.bfloat16):
    from cmoe.config import CMoEConfig
    from cmoe.moe import CMoEMLP, MoELayerSpec

    cfg = CMoEConfig.parse(preset)  # the default recipe's router
    m = f // cfg.experts
    spec = MoELayerSpec(d, cfg.shared * m, cfg.experts - cfg.shared, m, cfg.active, "silu", cfg.router)
    moe = CMoEMLP(spec, impl="triton").cuda().to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
        for name in ("gate", "up"):  # the analytical router's rows are unit vectors
            if hasattr(moe.router, name):
                getattr(moe.router, name).copy_(F.normalize(getattr(moe.router, name).float(), dim=-1))
        moe.router.scale.zero_()
    return moe


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    p.add_argument("--configs", nargs="+", default=["S3A3E8", "S2A2E8", "S1A1E8", "S2A2E16"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 32, 128, 256, 2048, 16384])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--sweep", action="store_true", help="time tile configurations of the Triton kernels")
    p.add_argument("--no-grouped-sweep", dest="grouped_sweep", action="store_false",
                   help="with --sweep: time only the grouped configuration in use, not every candidate")
    p.add_argument("--fold-max-tokens", type=int, default=None,
                   help="fold the shared expert into the expert kernels up to this many tokens (default: the op's setting)")
    p.add_argument("--masked", action="store_true",
                   help="time tile configurations of the masked path (the whole layer) against the other paths")
    p.add_argument("--paths", action="store_true",
                   help="the whole layer on each path (masked, dense, grouped/few-token) and on the one in use")
    p.add_argument("--kernels", action="store_true",
                   help="also profile the dense and the MoE layers' CUDA graphs: time per kernel")
    args = p.parse_args(argv)
    if args.fold_max_tokens is not None:
        from cmoe import triton_experts as te

        te.SHARED_FOLD_MAX_TOKENS = args.fold_max_tokens
    if args.sweep:
        return sweep(args)
    if args.masked or args.paths:
        return sweep_masked(args)

    from cmoe import experts
    from cmoe import triton_experts as te

    d, f = SHAPES[args.shape]
    dt = torch.bfloat16
    bw = 4.3e12
    dense = [
        [torch.randn(f, d, device="cuda", dtype=dt) * 0.02 for _ in range(3)] for _ in range(args.copies)
    ]  # gate, up, down^T

    def dense_fn(x):
        def run():
            for wg, wu, wd in dense:
                (F.silu(x @ wg.T) * (x @ wu.T)) @ wd

        return run

    print(f"# {torch.cuda.get_device_name()} shape {args.shape} d={d} f={f}; times per layer (us)")
    for preset in args.configs:
        layers = [make_moe(d, f, preset) for _ in range(args.copies)]
        s = layers[0].spec
        print(f"\n## {preset}: shared {s.shared_size}, {s.num_experts} x {s.expert_size}, top {s.top_k}")
        print("T | dense | moe | ratio | bytes-limit | router | experts | experts(gemv) | experts(grouped) | shared | torch-grouped(ev) | err")
        for T in args.tokens:
            x = torch.randn(T, d, device="cuda", dtype=dt)
            lay = layers[0]
            with torch.no_grad():
                idx, w, _ = lay.router(x)
                touched = int(torch.unique(idx).numel())
                err = float("nan")
                if T <= 256:
                    ref = experts.loop_experts(x.float(), idx, w, lay.experts.gate_up_proj.float(), lay.experts.down_proj.float(), "silu")
                    out = te.triton_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu")
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    out = te._grouped_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu").sum(1)
                    err = max(err, ((out.float() - ref).norm() / ref.norm()).item())
                    if T * s.top_k <= 64:
                        out = te._gemv_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu")
                        err = max(err, ((out.float() - ref).norm() / ref.norm()).item())

                t_dense = graph_ms(dense_fn(x)) / args.copies * 1e3

                def moe_run():
                    for lay in layers:
                        lay(x)

                t_moe = graph_ms(moe_run) / args.copies * 1e3

                def comp(fn):
                    def run():
                        for lay in layers:
                            fn(lay)

                    return graph_ms(run) / args.copies * 1e3

                t_router = comp(lambda lay: lay.router(x))
                t_exp = comp(lambda lay: te.triton_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu"))
                t_gemv = (
                    comp(lambda lay: te._gemv_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu"))
                    if T * s.top_k <= 64 else float("nan")
                )
                t_grp = comp(lambda lay: te._grouped_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu").sum(1))
                t_sh = comp(lambda lay: lay.shared(x))
                t_tg = float("nan")
                if T >= 256:
                    t_tg = sum(
                        event_ms(lambda lay=lay: experts.grouped_experts(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu"))
                        for lay in layers
                    ) / args.copies * 1e3
                if args.kernels:
                    from cmoe.bench import profile_kernels

                    for label, fn in (("dense", dense_fn(x)), (preset, moe_run)):
                        profile_kernels(capture(fn).replay, 5, print, f"{label} T={T} ({args.copies} layers)", top=12)
            # bytes limit: weights touched (activations ignored)
            b_dense = 3 * d * f * 2
            b_moe = (3 * d * s.shared_size + touched * 3 * d * s.expert_size + 2 * s.num_experts * d) * 2
            fl_dense = 2 * T * 3 * d * f
            fl_moe = 2 * T * 3 * d * s.active_size
            lim = max(b_dense / bw, fl_dense / 7.9e14) / max(b_moe / bw, fl_moe / 7.9e14)
            print(
                f"{T} | {t_dense:.1f} | {t_moe:.1f} | {t_dense / t_moe:.2f} | {lim:.2f} | {t_router:.1f} | {t_exp:.1f} | "
                f"{t_gemv:.1f} | {t_grp:.1f} | {t_sh:.1f} | {t_tg:.1f} | {err:.1e}",
                flush=True,
            )
        del layers
        torch.cuda.empty_cache()
    return 0


GEMV_CANDIDATES = [(8, 512, 4), (4, 1024, 4), (2, 1024, 4), (4, 512, 4), (16, 256, 4), (16, 512, 8), (8, 1024, 8)]
FEW_CANDIDATES = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 256, 4, 4), (32, 64, 4, 4),
                  (32, 128, 8, 3), (64, 64, 8, 3)]
FEW_GROUP_CANDIDATES = [1, 2, 3, 4, 6, 8]  # expert groups of the few-token down kernel (one output slot each)
FEW_SWEEP_MAX_TOKENS = 128  # the few-token path is tried up to this many tokens (it serves up to te.FEW_MAX_TOKENS)
GROUPED_CANDIDATES = [
    dict(bt=32, gate_up=(32, 256, 4, 3), down=(64, 256, 4, 3)),
    dict(bt=32, gate_up=(64, 256, 8, 3), down=(64, 256, 8, 3)),
    dict(bt=64, gate_up=(32, 256, 4, 3), down=(64, 256, 4, 3)),
    dict(bt=16, gate_up=(64, 128, 4, 4), down=(64, 128, 4, 4)),
    dict(bt=16, gate_up=(32, 128, 4, 4), down=(32, 128, 4, 4)),
    dict(bt=16, gate_up=(32, 256, 4, 3), down=(64, 256, 4, 3)),
    dict(bt=32, gate_up=(64, 128, 4, 4), down=(64, 128, 4, 4)),
    dict(bt=64, gate_up=(64, 64, 4, 4), down=(128, 64, 4, 4)),
    dict(bt=64, gate_up=(64, 128, 4, 3), down=(128, 128, 8, 3)),
    dict(bt=128, gate_up=(64, 64, 8, 3), down=(128, 64, 8, 3)),
    dict(bt=128, gate_up=(128, 64, 8, 3), down=(256, 64, 8, 3)),
    dict(bt=128, gate_up=(64, 64, 4, 4), down=(128, 64, 4, 4)),
    dict(bt=128, gate_up=(128, 64, 8, 4), down=(256, 64, 8, 4)),
    dict(bt=128, gate_up=(128, 128, 8, 3), down=(128, 128, 8, 3)),
    dict(bt=128, gate_up=(256, 64, 8, 3), down=(256, 64, 8, 3)),
    dict(bt=64, gate_up=(128, 64, 4, 4), down=(256, 64, 8, 4)),
    dict(bt=256, gate_up=(64, 64, 8, 3), down=(128, 64, 8, 3)),
    # deeper pipelines for the weight-streaming (decode) sizes
    dict(bt=16, gate_up=(64, 128, 4, 6), down=(64, 128, 4, 6)),
    dict(bt=16, gate_up=(128, 64, 4, 6), down=(128, 64, 4, 6)),
    dict(bt=32, gate_up=(64, 128, 4, 5), down=(128, 128, 4, 4)),
    dict(bt=64, gate_up=(64, 64, 4, 6), down=(128, 64, 4, 6)),
    dict(bt=64, gate_up=(64, 128, 4, 4), down=(128, 64, 4, 6)),
    dict(bt=16, gate_up=(32, 256, 4, 4), down=(64, 256, 4, 4)),
]


def sweep(args) -> int:
    from cmoe import triton_experts as te

    d, f = SHAPES[args.shape]
    print(f"# sweep {torch.cuda.get_device_name()} {args.shape}")
    for preset in args.configs:
        layers = [make_moe(d, f, preset) for _ in range(args.copies)]
        s = layers[0].spec
        for T in args.tokens:
            x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                idx, w, _ = te.fused_route(layers[0].router, x)
                path, S = te._plan(T, s.top_k, s.shared_size, s.expert_size, s.num_experts)  # what triton_experts_op runs for T
                fold = S > 0  # the shared expert inside the kernels, in S pieces

                def sh(lay):
                    return (lay.shared_gate_up.weight, lay.shared_down.weight) if fold else None

                ref = te._grouped_experts(x, idx, w, layers[0].experts.gate_up_proj, layers[0].experts.down_proj, "silu",
                                          shared=sh(layers[0])).sum(1)

                def t_of(fn):
                    def run():
                        for lay in layers:
                            fn(lay)

                    return graph_ms(run) / args.copies * 1e3

                t_r = t_of(lambda lay: te.fused_route(lay.router, x))
                tries = []  # (path, kernel function, tile configuration)
                if T * s.top_k <= 32:
                    tries += [("gemv", te._gemv_experts, {"gate_up": gu, "down": dn}) for gu in GEMV_CANDIDATES
                              for dn in GEMV_CANDIDATES if gu == dn or dn in GEMV_CANDIDATES[:3]]
                if T <= FEW_SWEEP_MAX_TOKENS:
                    tries += [("few", te._few_experts, {"gate_up": gu, "down": dn}) for gu in FEW_CANDIDATES
                              for dn in FEW_CANDIDATES if gu == dn or dn == FEW_CANDIDATES[1]]
                    tries += [("few", te._few_experts, {**te.FEW_CONFIG, "groups": g}) for g in FEW_GROUP_CANDIDATES]
                grouped = GROUPED_CANDIDATES if args.grouped_sweep else [te.grouped_config(T * (S + s.top_k))]
                tries += [("grouped", te._grouped_experts, cfg) for cfg in grouped]
                res = []
                for kind, fn, cfg in tries:

                    def call(lay, fn=fn, cfg=cfg):
                        y = fn(x, idx, w, lay.experts.gate_up_proj, lay.experts.down_proj, "silu", cfg, sh(lay))
                        return y.sum(1) if y.dim() == 3 else y  # grouped and few-token paths: one output per slot

                    try:  # every candidate is checked against the reference before it is timed
                        out = call(layers[0])
                        assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
                        t = t_of(call)
                    except Exception as e:  # noqa: BLE001
                        print("  fail", kind, cfg, type(e).__name__, str(e)[:100])
                        continue
                    res.append((t, kind, cfg))
                res.sort(key=lambda r: r[0])
                touched = int(torch.unique(idx).numel())
                mb = ((touched * s.expert_size + (s.shared_size if fold else 0)) * 3 * d * 2) / 1e6
                print(f"{preset} T={T} touched={touched} shared folded={fold} ({mb:.0f} MB) router {t_r:.1f} us; best:")
                for t, kind, cfg in res[:4]:
                    print(f"   {t:7.1f} us {mb / t * 1e-3 * 1e3:6.2f} TB/s  {kind} {cfg}")
                used = (path, {"gemv": te.GEMV_CONFIG, "few": te.FEW_CONFIG}.get(path) or te.grouped_config(T * (S + s.top_k)))
                cur = [r for r in res if (r[1], r[2]) == used]
                if not cur:
                    print("   current config not among the candidates")
                for t, kind, cfg in cur:
                    print(f"   current: {t:7.1f} us {kind} {cfg}")
        del layers
        torch.cuda.empty_cache()
    return 0


MASKED_BT = [16, 32, 64, 128]
MASKED_TILES = [(32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (16, 256, 4, 3), (64, 128, 8, 3),
                (128, 64, 8, 3), (64, 64, 8, 4)]
MASKED_GROUPS = [1, 2, 4, 8]


def sweep_masked(args) -> int:
    """The whole layer (router + experts) per token count on each path: grouped/few-token/GEMV
    (router, then the experts op), dense (cuBLAS on every neuron, masked), masked (two kernels),
    and the one in use. With --masked, also the masked path's tiles in stages: tokens per tile and
    gate/up tiles, then the down tiles, then the number of expert groups; each candidate checked
    against the grouped/few-token result."""
    from cmoe import triton_experts as te

    d, f = SHAPES[args.shape]
    print(f"# paths of the whole layer {torch.cuda.get_device_name()} {args.shape}; us per layer")
    for preset in args.configs:
        layers = [make_moe(d, f, preset) for _ in range(args.copies)]
        s = layers[0].spec
        S = -(-s.shared_size // s.expert_size)
        for T in args.tokens:
            x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

            def t_of(fn):
                def run():
                    for lay in layers:
                        fn(lay)

                return graph_ms(run) / args.copies * 1e3

            with torch.no_grad():
                keep = (te.MASKED_MAX_TOKENS, te.DENSE_MAX_WORK, te.GROUPED_MM_MIN_ROWS, te.SHARED_FOLD_MAX_TOKENS,
                        te.DENSE_MIN_TOKENS, te.DENSE_MIN_ACTIVE)
                try:
                    # the Triton grouped, few-token or GEMV path
                    te.MASKED_MAX_TOKENS, te.DENSE_MAX_WORK, te.GROUPED_MM_MIN_ROWS = 0, 0, 1 << 30
                    ref = layers[0](x).float()
                    t_other = t_of(lambda lay: lay(x))
                    # the dense path (cuBLAS, every neuron, masked), at any size
                    te.DENSE_MAX_WORK, te.DENSE_MIN_TOKENS, te.DENSE_MIN_ACTIVE = 1 << 30, 0, 0.0
                    out = layers[0](x).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    t_dense = t_of(lambda lay: lay(x)) if err < 1e-2 else float("nan")
                    t_gmm = err_gmm = float("nan")
                    if T > te.FEW_MAX_TOKENS:  # torch._grouped_mm for the routed experts, cuBLAS for the shared one
                        te.DENSE_MAX_WORK, te.GROUPED_MM_MIN_ROWS, te.SHARED_FOLD_MAX_TOKENS = 0, 0, 0
                        out = layers[0](x).float()
                        err_gmm = ((out - ref).norm() / ref.norm()).item()
                        t_gmm = t_of(lambda lay: lay(x)) if err_gmm < 1e-2 else float("nan")
                finally:
                    (te.MASKED_MAX_TOKENS, te.DENSE_MAX_WORK, te.GROUPED_MM_MIN_ROWS, te.SHARED_FOLD_MAX_TOKENS,
                     te.DENSE_MIN_TOKENS, te.DENSE_MIN_ACTIVE) = keep
                t_used = t_of(lambda lay: lay(x))  # what the layer runs now

                def masked_t(cfg):
                    def call(lay):
                        sh = (lay.shared_gate_up.weight, lay.shared_down.weight) if S else None
                        return te._masked_moe(x, lay.experts.gate_up_proj, lay.experts.down_proj, sh, te.router_args(lay.router),
                                              "silu", s.top_k, cfg).sum(1)

                    try:
                        out = call(layers[0]).float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        assert err < 1e-2, f"rel err {err:.1e}"
                        return t_of(call)
                    except Exception as e:  # noqa: BLE001
                        print("  fail", cfg, type(e).__name__, str(e)[:100])
                        return float("inf")

                t_cur = masked_t(te.masked_config(T))
                res = []
                default_dn = (32, 128, 4, 3)
                for bt in [b for b in MASKED_BT if b <= max(16, triton.next_power_of_2(T)) and args.masked]:
                    for gu in MASKED_TILES:
                        cfg = dict(bt=bt, gate_up=gu, down=default_dn, groups=4)
                        res.append((masked_t(cfg), cfg))
                best = min(res, key=lambda r: r[0])[1] if res else None
                for dn in MASKED_TILES if res else []:
                    cfg = {**best, "down": dn}
                    res.append((masked_t(cfg), cfg))
                best = min(res, key=lambda r: r[0])[1] if res else None
                for g in MASKED_GROUPS if res else []:
                    cfg = {**best, "groups": g}
                    res.append((masked_t(cfg), cfg))
                res.sort(key=lambda r: r[0])
            path = "masked" if te.use_masked(T, s.top_k, S, s.num_experts) else (
                "dense" if te.use_dense(T, s.active_size, s.intermediate_size) else
                te._plan(T, s.top_k, s.shared_size, s.expert_size, s.num_experts, te.grouped_mm_ok(x, d, s.expert_size))[0])
            print(f"{preset} T={T}: grouped/few/gemv {t_other:.1f} us, dense {t_dense:.1f} us (err {err:.1e}), "
                  f"grouped_mm {t_gmm:.1f} us (err {err_gmm:.1e}), masked {t_cur:.1f} us; in use ({path}) {t_used:.1f} us"
                  + ("; best masked:" if res else ""))
            for t, cfg in res[:3]:
                print(f"   {t:7.1f} us  {cfg}", flush=True)
        del layers
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
