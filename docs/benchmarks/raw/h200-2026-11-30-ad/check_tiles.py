"""Correctness of the batch-1 GEMV kernels at other tiles on the GPU (llama shapes, bf16), against
the loop oracle in float64: the whole GEMV op (router + gate/up + down) and cmoe.gemv.launch."""
import sys
import torch
import torch.nn.functional as F
from cmoe import experts, gemv, triton_experts as te
from cmoe.moe import CMoEMLP, MoELayerSpec

ARMS = {
    "default": None,
    "w16": {"gate_up": (2, 4096, 16), "down": (1, 1024, 16), "gemv": (2, 4096, 16)},
    "w8": {"gate_up": (2, 4096, 8), "down": (2, 1024, 8), "gemv": (2, 4096, 8)},
}

def shared_ref(x, sgu, sd):
    g, u = (x.double() @ sgu.double().T).chunk(2, -1)
    return (F.silu(g) * u) @ sd.double().T

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4096, 11008, 16, 2, 2), (4096, 14336, 8, 1, 1), (4096, 11008, 8, 3, 3), (576, 1536, 8, 1, 1)] if DEV == "cuda" else [(64, 96, 4, 1, 1), (64, 96, 4, 1, 2)]
torch.manual_seed(0)
worst = 0.0
for name, cfg in ARMS.items():
    if cfg:
        te.GEMV_CONFIG["gate_up"], te.GEMV_CONFIG["down"] = cfg["gate_up"], cfg["down"]
        gemv.GEMV_TILE = cfg["gemv"]
    for d, f, E, S, a in SHAPES:
        m = f // E
        for T in (1, 2) if a <= 2 else (1,):
            x = torch.randn(T, d, device=DEV, dtype=torch.bfloat16)
            gu = torch.randn(E - S, 2 * m, d, device=DEV, dtype=torch.bfloat16) / d**0.5
            dn = torch.randn(E - S, d, m, device=DEV, dtype=torch.bfloat16) / m**0.5
            sgu = torch.randn(2 * S * m, d, device=DEV, dtype=torch.bfloat16) / d**0.5
            sd = torch.randn(d, S * m, device=DEV, dtype=torch.bfloat16) / (S * m) ** 0.5
            rg = torch.randn(E - S, d, device=DEV, dtype=torch.bfloat16) / d**0.5
            ru = torch.randn(E - S, d, device=DEV, dtype=torch.bfloat16) / d**0.5
            bias = torch.zeros(E - S, device=DEV)
            scale = torch.ones((), device=DEV)
            out = te.triton_gemv_op(x, gu, dn, sgu, sd, rg, ru, bias, scale, False, "silu", a)
            idx, w, _ = te.triton_route_op(x, rg, ru, bias, scale, "silu", a, False)
            ref = experts.loop_experts(x.double(), idx, w.double(), gu.double(), dn.double(), "silu") + shared_ref(x, sgu, sd)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            y = gemv.gemv(x[0], sgu)
            e2 = ((y.double() - x[0].double() @ sgu.double().T).norm() / (x[0].double() @ sgu.double().T).norm()).item()
            worst = max(worst, err, e2)
            print(f"{name} d={d} f={f} E={E} S={S} a={a} T={T}: op rel err {err:.2e}, gemv rel err {e2:.2e}")
print(f"worst {worst:.2e}")
sys.exit(0 if worst < 2e-2 else 1)
