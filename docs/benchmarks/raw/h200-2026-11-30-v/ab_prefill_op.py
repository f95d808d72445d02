"""Session 17: the prefill whole-layer op (.carry/s17/prefill-op.patch applied) against route-then-experts.

Apply first: git apply .carry/s17/prefill-op.patch. Variant "two ops": te.prefill_moe returns None (the
router, then triton_experts_op, which starts the shared expert on the second stream after the router).
Variant "one op": the patch's triton_prefill_op (the shared expert's GEMMs start first, the router beside).
Each variant is compiled and captured once; the two graphs are then replayed alternately.
"""
import sys
import time

import torch
import triton

import cmoe.triton_experts as te
from cmoe import bench
from cmoe.attention import unpadded_prefill
from cmoe.fused_qkv import fused_qkv

ONE_OP = te.prefill_moe


def use(variant):
    te.prefill_moe = ONE_OP if variant == "one op" else (lambda layer, x: None)


def capture(fwd):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fwd(); fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fwd()
    return g, out


def replay_ms(g, reps=5):
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return sorted(ts)[reps // 2]


@torch.no_grad()
def main(names, configs, shapes=((1, 2048), (8, 2048)), rounds=5):
    print(time.strftime("# %Y-%m-%d %H:%M UTC", time.gmtime()), torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print("| model | config | prefill | dense ms | two ops ms | one op ms | two ops vs dense | one op vs dense | one / two |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        dense = {}
        model = bench.build_dense(name, layers=4)
        for b, s in shapes:
            ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
            with unpadded_prefill(), fused_qkv(model):
                g, _ = capture(bench.prefill_forward(model, ids))
                dense[(b, s)] = sorted(replay_ms(g) for _ in range(rounds))[rounds // 2]
                del g
        del model
        torch.cuda.empty_cache()
        for cfg in configs:
            model = bench.build_dense(name, layers=4)
            bench.convert_model_(model, cfg)
            for b, s in shapes:
                ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
                graphs, outs = {}, {}
                with unpadded_prefill(), fused_qkv(model):
                    fwd = bench.prefill_forward(model, ids)
                    for v in ("two ops", "one op"):
                        use(v)
                        graphs[v], out = capture(fwd)
                        outs[v] = out.logits.float().clone()
                    use("one op")
                    res = {v: [] for v in graphs}
                    for _ in range(rounds):
                        for v in graphs:
                            res[v].append(replay_ms(graphs[v]))
                err = ((outs["one op"] - outs["two ops"]).norm() / outs["two ops"].norm()).item()
                d = dense[(b, s)]
                o, n = (sorted(res[v])[rounds // 2] for v in ("two ops", "one op"))
                print(f"| {name} | {cfg} | {b}x{s} | {d:.3f} | {o:.3f} | {n:.3f} | {d/o:.4f}x | {d/n:.4f}x | {o/n:.4f} |"
                      f" (two ops {[round(t, 3) for t in res['two ops']]}, one op {[round(t, 3) for t in res['one op']]};"
                      f" logits rel diff {err:.1e})", flush=True)
                del graphs, fwd
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or ["llama2-7b", "llama3-8b"], ["S2A2E8", "S1A1E8", "S2A2E16"])
