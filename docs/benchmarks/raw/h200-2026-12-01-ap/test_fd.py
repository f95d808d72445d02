"""Session 37: the two-launch dense path prototype against the loop oracle (CPU interpreter or GPU)."""
import sys
import pytest
import torch

sys.path.insert(0, "tests")
sys.path.insert(0, ".carry/s37")
from test_triton_experts import ACTS, DEVICE, TOL, _biased, _moe, rel_err, te  # noqa: E402
import fd  # noqa: E402

SMALL = dict(bt=16, gate_up=(8, 16, 4, 2), down=(16, 16, 4, 2), groups=3, route=(16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,a,shared,router", [(1, 2, 20, "analytical"), (3, 1, 45, "linear"), (17, 2, 0, "linear"),
                                               (40, 3, 30, "analytical"), (33, 5, 20, "analytical")])
def test_fd_matches_reference(T, a, shared, router, dtype):
    act = ACTS[(T + a) % len(ACTS)]
    mod = _biased(_moe(dtype, act=act, a=a, shared=shared, router=router), seed=T)
    with torch.no_grad():
        mod.router.scale.copy_(torch.linspace(-0.5, 0.5, 5))
    x = torch.randn(T, 36, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    cfg = SMALL if DEVICE == "cpu" else {"bt": 32, "gate_up": (16, 32, 4, 2), "down": (32, 32, 4, 2), "groups": 3, "route": (16, 16)}
    shared_w = (mod.shared_gate_up.weight, mod.shared_down.weight) if shared else (None, None)
    with torch.no_grad():
        for _ in range(2):  # twice: the flags are set back to 0
            out = fd.fd_moe(x, mod.experts.gate_up_proj, mod.experts.down_proj, *shared_w, *te.router_args(mod.router),
                            mod.spec.act, a, cfg)
            ref = mod.float().forward_reference(x.float()).double()
            mod.to(dtype)
            assert rel_err(out.sum(1), ref) < TOL[dtype]
