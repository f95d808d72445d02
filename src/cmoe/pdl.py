"""Programmatic dependent launch (PDL) for the decode step's Triton kernels (Hopper and newer).

A decode step at batch 1 is a chain of short kernels, each waiting for the one before. With PDL a
kernel is launched before its predecessor has finished: its programs become resident, read what
no kernel of the step writes (weights), then wait on the device (``griddepcontrol.wait``) until
the predecessor has completed and its writes are visible. Each kernel lets its successor launch
right after that wait, so a kernel's code before the wait runs beside its predecessor only: every
kernel before that one has completed.

The kernels that take part (``cmoe.gemv``, ``cmoe.decode_attention``, the batch-1 MoE op of
``cmoe.triton_experts``) have a ``PDL`` constexpr and are launched with ``**launch(x)``. A kernel
launched so must call ``wait`` on every path before it reads or writes what another kernel of the
step touches. In the decode step that ``cmoe.generation`` captures, inductor's kernels take part
too (``torch._inductor.config.triton.enable_pdl``), dense and converted models alike. Set
``cmoe.pdl.ENABLED = False`` before generating to launch every kernel as before.

H200, the captured decode step at batch 1, llama2-7b shape, 4 layers (docs/benchmarks/speed-h200-log.md,
run ak): dense 0.6175 -> 0.6005 ms, S1A1E8 0.3953 -> 0.3732 ms, S2A2E16 0.3978 -> 0.3761 ms.
"""

from __future__ import annotations

import torch
import torch._inductor.config
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = True  # launch the kernels above with PDL on GPUs that have it (compute capability 9.0 and up)


def on(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: ``ENABLED``, a CUDA device of compute
    capability 9.0 or more, not the interpreter."""
    from .triton_experts import _INTERPRET  # here: triton_experts imports this module

    device = torch.device(device)
    return ENABLED and device.type == "cuda" and not _INTERPRET and torch.cuda.get_device_capability(device) >= (9, 0)


def launch(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel working on x: ``PDL`` (its constexpr) and ``launch_pdl``."""
    pdl = on(x.device)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


def inductor_options() -> dict:
    """The ``torch.compile`` options that launch inductor's kernels with PDL: {} where this torch's
    inductor has no such option."""
    try:
        torch._inductor.config.triton.enable_pdl  # noqa: B018
    except AttributeError:
        return {}
    return {"triton.enable_pdl": True}


@triton.jit
def wait(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has completed (its writes visible), then let the
    next kernel launch. Without: nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
