"""The layer-by-layer conversion pipeline.

1. Run the calibration tokens through the embeddings once, recording each decoder layer's
   call arguments (positions, masks, rotary tables) and layer 0's input hidden states.
2. For each layer, with only that layer on the compute device:
   a. run it with its FFN replaced by a probe that records the FFN inputs x and returns 0:
      the layer's output is then exactly its residual stream before the FFN's contribution,
   b. carve the FFN into a CMoE layer and swap it in,
   c. add the CMoE layer's contribution to get the converted layer's outputs, the next
      layer's inputs (errors propagate, as in the paper), without running attention twice.

With a down refit toward the dense stream (``refit_stream`` > 0) the dense model's hidden
states are carried along too (one more layer pass each), and the refit is told what the layer
must add to its converted residual stream to land on the dense model's next hidden state.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocation
from .analysis import check_activations
from .carve import CarveStats, carve
from .config import CMoEConfig, ConfigError
from .families import family_of
from .moe import CMoEMLP


@dataclass
class LayerReport:
    layer: int
    seconds: float
    stats: CarveStats


@dataclass
class ConversionReport:
    config: CMoEConfig
    seconds: float = 0.0
    peak_memory_bytes: int = 0  # on the compute device (CUDA) or process max RSS (CPU)
    layers: list[LayerReport] = field(default_factory=list)
    sensitivity: list[list[float]] | None = None  # with a budget: cost [L][k] of k active units

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    pass


class _ZeroProbe(nn.Module):
    """Stands in for an FFN: records its inputs, contributes nothing."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.reshape(-1, x.shape[-1]))
        return torch.zeros_like(x)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, store: str):
    """-> (hidden inputs of layer 0 [N, S, d] on ``store``, per-layer (args, kwargs) of sample 0)."""
    calls: list[tuple] = [None] * len(layers)
    hidden: list[torch.Tensor] = []
    sample = [0]

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                hidden.append(hidden_states.to(store))
            if sample[0] == 0:
                calls[i] = (_to(args, store), _to(kwargs, store))
            if i == len(layers) - 1 or sample[0] > 0:
                raise _Stop
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        dev = next(base.parameters()).device
        for n in range(calib_ids.shape[0]):
            sample[0] = n
            try:
                base(input_ids=calib_ids[n : n + 1].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return torch.cat(hidden), calls


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _without_ffn(layer, family, mlp, hidden, args, kwargs, device, batch_size):
    """Run ``layer`` on ``hidden [N, S, d]`` with its FFN replaced by a probe that records its
    inputs and adds nothing: (the residual streams before the FFN's contribution, per batch of
    ``batch_size`` sequences on ``device``; the FFN inputs [N*S, d])."""
    probe = _ZeroProbe()
    setattr(layer, family.mlp_attr, probe)
    try:
        residual = [_first(layer(h.to(device), *args, **kwargs)) for h in hidden.split(batch_size)]
    finally:
        setattr(layer, family.mlp_attr, mlp)
    return residual, torch.cat(probe.inputs)


def _with_ffn(layer, family, ffn, residual, x):
    """The layer's outputs, per batch: the residual streams from ``_without_ffn`` plus what
    ``ffn`` adds for the FFN inputs x [N*S, d] (in the same order)."""
    sizes = [r.numel() // r.shape[-1] for r in residual]
    return [r + family.ffn_residual(layer, ffn(xr).view_as(r)) for r, xr in zip(residual, x.split(sizes))]


def _stream_refit(config: CMoEConfig, family) -> bool:
    """Whether the down refit pulls toward the dense model's stream. Not for families whose FFN
    output passes a norm before the residual add (no linear inverse): they fit the FFN output."""
    return config.refit == "down" and config.refit_stream > 0 and not family.post_ffn_norm


SENSITIVITY_SAMPLES = 2  # calibration sequences of the dense pass that measures layer sensitivity


@torch.no_grad()
def _sensitivity_pass(model, family, layers, hidden, calls, config, device, batch_size) -> torch.Tensor:
    """Dense pass over a few calibration sequences: costs [L, e + 1] (``cmoe.allocation``)."""
    hidden = hidden[:SENSITIVITY_SAMPLES]
    costs = []
    for i, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        args, kwargs = _to(calls[i], device)
        mlp = getattr(layer, family.mlp_attr)
        residual, x = _without_ffn(layer, family, mlp, hidden, args, kwargs, device, batch_size)
        check_activations(x)
        hidden = torch.cat([h.to("cpu") for h in _with_ffn(layer, family, mlp, residual, x)])
        del residual
        # typical residual-stream energy: d x the median per-dimension energy (robust to the few
        # "massive activation" dimensions that would otherwise make some layers look insensitive)
        per_dim = hidden.float().pow(2).reshape(-1, hidden.shape[-1]).mean(0)  # [d]
        energy = (per_dim.median() * per_dim.numel()).item()
        costs.append(allocation.sensitivity(x, family.read(mlp, model.config), energy, config.experts).cpu())
        layer.to(home)
    return torch.stack(costs)


@torch.no_grad()
def convert_(
    model: nn.Module,
    config: CMoEConfig,
    calib_ids: torch.Tensor,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> ConversionReport:
    """Convert every FFN of ``model`` into a CMoE layer, in place, layer by layer.

    ``calib_ids``: calibration token ids [N, S]. ``device``: where each layer is computed
    (default: CUDA if available); the model may live elsewhere (CPU): only the layer being
    converted and its activations are moved to ``device``.
    """
    family = family_of(model.config)
    layers = family.layers(model)
    if calib_ids.ndim != 2 or calib_ids.shape[0] < 1 or calib_ids.shape[1] < 2:
        raise ConfigError(f"calibration ids must be [N >= 1, S >= 2], got shape {tuple(calib_ids.shape)}")
    for layer in layers:
        mlp = getattr(layer, family.mlp_attr)
        if isinstance(mlp, CMoEMLP):
            raise ConfigError("the model is already converted")
        config.check_layer(family.read(mlp, model.config).intermediate_size)
    if config.allocation == "sensitivity":  # fail before any work
        allocation.allocate(torch.zeros(len(layers), config.experts + 1), config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    report = ConversionReport(config)
    torch.manual_seed(config.seed)

    store = "cpu"
    hidden, calls = _record_layer_calls(model, layers, calib_ids, store)  # [N, S, d]
    dense_hidden = hidden if _stream_refit(config, family) else None  # the dense model's stream
    plan = [config] * len(layers)
    if config.allocation == "sensitivity":
        report.sensitivity = _sensitivity_pass(model, family, layers, hidden, calls, config, device, batch_size).tolist()
        plan = [config.replace(shared=a.shared, active=a.active, budget=None, allocation="uniform")
                for a in allocation.allocate(torch.tensor(report.sensitivity), config)]
    specs = []
    bar = tqdm(layers, desc=f"convert {config.name}", unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        t0 = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(device)
        args, kwargs = _to(calls[i], device)
        mlp = getattr(layer, family.mlp_attr)

        residual, x = _without_ffn(layer, family, mlp, hidden, args, kwargs, device, batch_size)
        toward = None
        if dense_hidden is not None:  # what this FFN must add to land on the dense next hidden state
            dense_next = _with_ffn(layer, family, mlp, *_without_ffn(layer, family, mlp, dense_hidden, args, kwargs, device, batch_size))
            toward = torch.cat([(dn - r).reshape(-1, r.shape[-1]) for dn, r in zip(dense_next, residual)])
            if family.ffn_multiplier:
                toward = toward / getattr(layer, family.ffn_multiplier)
            dense_hidden = torch.cat([dn.to(store) for dn in dense_next])
            del dense_next

        weights = family.read(mlp, model.config)
        moe, stats = carve(weights, x, plan[i], toward)
        setattr(layer, family.mlp_attr, moe)
        del mlp, weights
        hidden = torch.cat([h.to(store) for h in _with_ffn(layer, family, moe, residual, x)])
        del x, residual, toward
        layer.to(home)
        specs.append(moe.spec.to_dict())
        report.layers.append(LayerReport(i, time.perf_counter() - t0, stats))
        bar.set_postfix(agree=f"{stats.router_agreement:.2f}", coh=f"{stats.cohesion:.3g}")

    model.config.cmoe = {"config": config.to_dict(), "layers": specs}
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = _peak_memory(device)
    return report
