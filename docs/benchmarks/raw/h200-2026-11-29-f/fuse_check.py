import os
os.environ["TRITON_INTERPRET"]="1"
import torch
from cmoe.moe import CMoEMLP, MoELayerSpec
spec = MoELayerSpec(hidden_size=64, shared_size=32, num_experts=6, expert_size=16, top_k=2, act="silu", router="linear")
mod = CMoEMLP(spec).eval(); mod.impl = "triton"
norm = torch.nn.RMSNorm(64)
def block(x):
    h = x + mod(x)
    return norm(h)
x = torch.randn(1, 40, 64)
f = torch.compile(block, fullgraph=True)
with torch.no_grad():
    torch.testing.assert_close(f(x), norm(x + mod.forward_reference(x)), atol=1e-4, rtol=1e-4)
