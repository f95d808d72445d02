"""Session 20: batch 1, the GEMV op and its pieces against cuBLAS GEMVs of the same shapes, each timed
over a sequence of L = 6 layers with their own weights (as in a model: no layer's weights are still
in L2 when it runs again), in a CUDA graph (triton.testing.do_bench_cudagraph); per layer = sequence / L.
Pieces: the router + gate/up launch, the gate/up kernel without the router (routing given), the
down launch, the router alone; cuBLAS x @ [(S+a)*2m, d]^T, h @ [d, (S+a)*m]^T, and dense's FFN."""
import datetime

import torch
import torch.nn.functional as F
import triton.testing

from cmoe import triton_experts as te
from cmoe.moe import CMoEMLP, MoELayerSpec

print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()}", flush=True)
dev, bf, L = "cuda", torch.bfloat16, 6


def us(fn):
    """Per layer: the best of two do_bench_cudagraph runs of ``fn`` (L layers), divided by L."""
    return min(triton.testing.do_bench_cudagraph(fn, rep=300) for _ in range(2)) * 1e3 / L


def rnd(*shape):
    return torch.randn(*shape, device=dev, dtype=bf) * 0.02


x = torch.randn(1, 4096, device=dev, dtype=bf)
sync = te._gemv_sync(x)
for shape, f in (("llama2-7b", 11008), ("llama3-8b", 14336)):
    for name, E, a in (("S1A1E8", 8, 1), ("S2A2E16", 16, 2)):
        m = f // E
        S = E // 8
        spec = MoELayerSpec(hidden_size=4096, shared_size=S * m, num_experts=E - S, expert_size=m, top_k=a, act="silu",
                            router="analytical")
        with torch.no_grad():
            mods = []
            for _ in range(L):
                mod = CMoEMLP(spec, impl="triton").to(dev, bf).eval()
                for p in mod.parameters():
                    p.normal_(0, 0.02)
                mods.append(mod)
            args = [te.layer_args(mod) for mod in mods]
            ms = S * m
            sync.zero_()
            whole = us(lambda: [te.triton_gemv_op(x, *a_) for a_ in args])
            assert sync.tolist() == [0, 0], sync

            def rgu_all(i):
                gu, dn, sgu, sd, rg, ru, bias, scale, linear, act, top_k = args[i]
                return te._gemv_route_gate_up_all(x, gu, sgu, ms, S, rg, ru, bias, scale, linear, act, top_k, sync)

            zero = us(lambda: [sync.zero_() for _ in range(L)])
            rgu = us(lambda: [(sync.zero_(), rgu_all(i)) for i in range(L)]) - zero
            outs = []
            for i in range(L):  # each layer's h and routing, computed properly (flags zeroed first)
                sync.zero_()
                outs.append(rgu_all(i))
            sync.zero_()
            for i, (h, idx, wt) in enumerate(outs):
                assert 0 <= int(idx.min()) and int(idx.max()) < E - S, idx
            h2 = [torch.empty_like(o[0]) for o in outs]
            gate_up = us(lambda: [te._gemv_gate_up_all(x, outs[i][1], args[i][0], args[i][2], h2[i], ms, S, "silu", te.GEMV_CONFIG)
                                  for i in range(L)])
            down = us(lambda: [te._gemv_down_all(outs[i][0], outs[i][1], outs[i][2], args[i][1], args[i][3], ms, S,
                                                 te.GEMV_CONFIG, x.dtype) for i in range(L)])
            route = us(lambda: [te.fused_route(mod.router, x) for mod in mods])
            del mods, args, outs, h2
            rows = (S + a) * m
            w1 = [rnd(2 * rows, 4096) for _ in range(L)]
            w2 = [rnd(4096, rows) for _ in range(L)]
            hb = rnd(1, rows)
            c1 = us(lambda: [F.linear(x, w) for w in w1])
            c2 = us(lambda: [F.linear(hb, w) for w in w2])

            def same_bytes():
                for i in range(L):
                    g, u = F.linear(x, w1[i]).chunk(2, dim=-1)
                    F.linear(F.silu(g) * u, w2[i])

            cb = us(same_bytes)
            del w1, w2
            torch.cuda.empty_cache()
            dw = [(rnd(f, 4096), rnd(f, 4096), rnd(4096, f)) for _ in range(L)]
            dense = us(lambda: [F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d_) for g, u, d_ in dw])
            del dw
            torch.cuda.empty_cache()
        b1, b2 = 2 * rows * 4096 * 2, rows * 4096 * 2
        tb = lambda b, t: b / t / 1e6  # noqa: E731  TB/s from bytes and us
        print(f"{shape} {name} ({b1 / 1e6:.1f} + {b2 / 1e6:.1f} MB per layer), us per layer: op {whole:.2f} "
              f"({tb(b1 + b2, whole):.2f} TB/s); router+gate/up launch {rgu:.2f} ({tb(b1, rgu):.2f} TB/s); "
              f"gate/up kernel, routing given {gate_up:.2f} ({tb(b1, gate_up):.2f}); down {down:.2f} ({tb(b2, down):.2f}); "
              f"router alone (2 kernels) {route:.2f}; flag reset {zero:.2f}. cuBLAS: gate/up shape {c1:.2f} ({tb(b1, c1):.2f}), "
              f"down shape {c2:.2f} ({tb(b2, c2):.2f}), both + SiLU*up {cb:.2f} ({tb(b1 + b2, cb):.2f}); "
              f"dense FFN {dense:.2f} ({tb(3 * f * 4096 * 2, dense):.2f}); dense / op {dense / whole:.3f}, "
              f"dense / cuBLAS same bytes {dense / cb:.3f}", flush=True)
print("done", flush=True)
