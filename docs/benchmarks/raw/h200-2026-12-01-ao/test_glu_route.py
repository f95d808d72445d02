"""CPU (TRITON_INTERPRET=1) / GPU check of the prototype against the loop oracle."""
import sys
import torch
sys.path.insert(0, ".carry/s36")
sys.path.insert(0, "benchmarks")
from glu_route import pack, packed_layer, packed_layer_scores, router_rows  # noqa
from cmoe.moe import CMoEMLP, MoELayerSpec
from cmoe.triton_experts import router_args

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
ok = True
for (d, m, S, E, a, T, act, dt) in [(64, 24, 2, 5, 3, 7, "silu", torch.float32), (96, 40, 3, 5, 3, 1, "gelu_tanh", torch.float32),
                                   (64, 32, 2, 6, 2, 130, "silu", torch.bfloat16), (64, 16, 0, 4, 1, 5, "relu", torch.float32)]:
    spec = MoELayerSpec(d, S * m, E, m, a, act)
    layer = CMoEMLP(spec).to(dev).to(dt)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
        layer.router.bias.normal_(std=0.05)
    x = torch.randn(T, d, device=dev, dtype=dt)
    with torch.no_grad():
        ref = layer.forward_reference(x)
        G, D = pack(layer.shared_gate_up.weight, layer.experts.gate_up_proj, layer.shared_down.weight, layer.experts.down_proj)
        for two in (True, False):
            for bt, q in ((1, 1), (2, 3), (4, 2)):
                out = packed_layer(x, G, D, router_args(layer.router), S * m, m, act, a, two=two, bt=bt, bk=32, bm=16, q=q)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                tol = 2e-2 if dt == torch.bfloat16 else 1e-5
                good = err < tol
                ok &= good
                print(f"d={d} m={m} S={S} E={E} a={a} T={T} {act} {dt} two={two} bt={bt} q={q}: rel err {err:.2e} {'ok' if good else 'FAIL'}")
        r = router_args(layer.router)
        for beside in ((False, True) if dev == "cuda" else (False,)):
            out = packed_layer_scores(x, G, D, r, router_rows(r), S * m, m, act, a, beside=beside, bm=16)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            good = err < (2e-2 if dt == torch.bfloat16 else 1e-5)
            ok &= good
            print(f"scores path beside={beside} {act} {dt} T={T}: rel err {err:.2e} {'ok' if good else 'FAIL'}")
print("ALL OK" if ok else "FAILURES")
sys.exit(0 if ok else 1)
