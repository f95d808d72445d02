"""Session 13 (prepared, not run): in run r's profile the attention GEMVs (cuBLAS split-K) and the lm_head took
7 % longer in the S2A2E8 step than in the dense step (182.8 against 169.9 us per step, 71.9 against 67.5 us);
in run e (gate/up tiles (8, 512, 4) then) they took the same. Profiles, in one process: dense; S2A2E8 with the
new tiles; with the old ones; with the new tiles and the GEMV kernels' weight loads without
eviction_policy="evict_first"; the new tiles again; dense again.

    PYTHONPATH=src:benchmarks python .carry/s13/prof_tiles.py
"""
import datetime
import importlib
import inspect
import sys

import torch

from cmoe import bench
from cmoe import triton_experts as te
from cmoe.moe import set_expert_impl


def kernels_without_evict_first():
    """_gemv_gate_up and _gemv_down compiled from their source with the eviction hint removed."""
    src = ["import triton", "import triton.language as tl", "from cmoe.triton_experts import _act, _gate_up_rows", ""]
    for k in (te._gemv_gate_up, te._gemv_down):
        src.append(inspect.getsource(k.fn).replace(', eviction_policy="evict_first"', ""))
    with open("/tmp/cmoe_gemv_noevict.py", "w") as f:
        f.write("\n\n".join(src))
    sys.path.insert(0, "/tmp")
    mod = importlib.import_module("cmoe_gemv_noevict")
    return mod._gemv_gate_up, mod._gemv_down


BASE = (te._gemv_gate_up, te._gemv_down)
NOEVICT = kernels_without_evict_first()
NEW = dict(te.GEMV_CONFIG)
OLD = {**NEW, "gate_up": (8, 512, 4)}


def use(tiles, kernels):
    te.GEMV_CONFIG.clear()
    te.GEMV_CONFIG.update(tiles)
    te._gemv_gate_up, te._gemv_down = kernels


if __name__ == "__main__":
    log = lambda m: print(m, flush=True)
    log(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} {torch.cuda.get_device_name()} llama2-7b S2A2E8")
    dense = bench.build_dense("llama2-7b", layers=4)
    moe = bench.build_dense("llama2-7b", layers=4)
    bench.convert_model_(moe, "S2A2E8", (2, 512))
    set_expert_impl(moe, "auto")
    use(NEW, NOEVICT)
    log(f"no evict_first: check vs loop oracle: max rel err {bench.check_fast_path(moe, tokens=(1, 2)):.1e}")
    for label, model, tiles, kernels in (
        ("dense", dense, NEW, BASE), ("S2A2E8 new tiles", moe, NEW, BASE), ("S2A2E8 old tiles (8, 512, 4)", moe, OLD, BASE),
        ("S2A2E8 new tiles, no evict_first", moe, NEW, NOEVICT), ("S2A2E8 new tiles again", moe, NEW, BASE),
        ("dense again", dense, NEW, BASE),
    ):
        use(tiles, kernels)
        log(label)
        bench.profile_decode(model, 1, 512, 32, log)
