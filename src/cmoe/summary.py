"""What a converted model holds: experts, sizes, activated fractions, per-layer statistics."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from torch import nn

from .moe import moe_layers


@dataclass
class ParamSummary:
    total: int  # every parameter (embeddings included)
    ffn: int  # FFN expert weights (shared + routed)
    ffn_active: int  # FFN weights used per token (shared + top_k routed experts)
    router: int  # router parameters + buffers

    @property
    def ffn_active_fraction(self) -> float:
        return self.ffn_active / self.ffn

    @property
    def active_fraction(self) -> float:
        return (self.total - self.ffn + self.ffn_active) / self.total


def param_summary(model: nn.Module) -> ParamSummary:
    layers = moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    ffn = active = router = 0
    for moe in layers:
        s, per_neuron = moe.spec, 3 * moe.spec.hidden_size
        ffn += s.intermediate_size * per_neuron
        active += s.active_size * per_neuron
        router += sum(p.numel() for p in moe.router.parameters()) + sum(b.numel() for b in moe.router.buffers())
    return ParamSummary(total, ffn, active, router)


def render(table: Table) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()


def _num(value, fmt: str) -> str:
    """A statistic, or "-" where the recipe does not define it (NaN)."""
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def _refit_error(st: dict) -> str:
    """Relative FFN output error on the calibration tokens, before -> after the down refit."""
    before, after = st.get("error_before_refit", math.nan), st.get("error", math.nan)
    if before != before:
        return "-"
    return f"{before:.3f} -> {after:.3f}"


def layer_table(model: nn.Module, report: dict | None = None) -> Table:
    """Per layer: shared size, routed experts x size, top-k, activated FFN fraction (and the
    conversion statistics when a report is given)."""
    table = Table(title="CMoE layers")
    for col in ("layer", "shared", "routed", "top-k", "active FFN"):
        table.add_column(col, justify="right")
    stats = {r["layer"]: r for r in (report or {}).get("layers", [])}
    if stats:
        for col in ("shared rate", "routed rate", "assign cost", "cohesion", "router/oracle top-a",
                    "output error (refit)", "seconds"):
            table.add_column(col, justify="right")
    for i, moe in enumerate(moe_layers(model)):
        s = moe.spec
        row = [str(i), str(s.shared_size), f"{s.num_experts} x {s.expert_size}", str(s.top_k),
               f"{s.active_size / s.intermediate_size:.1%}"]
        if i in stats:
            st = stats[i]["stats"]
            row += [_num(st["shared_rate"], ".4f"), _num(st["routed_rate"], ".4f"), _num(st["assignment_cost"], ".4g"),
                    _num(st["cohesion"], ".4f"), _num(st.get("router_agreement", math.nan), ".3f"),
                    _refit_error(st), f"{stats[i]['seconds']:.2f}"]
        table.add_row(*row)
    return table


def summary_table(model: nn.Module) -> Table:
    p = param_summary(model)
    table = Table(title="CMoE model")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    layers = moe_layers(model)
    table.add_row("MoE layers", str(len(layers)))
    if layers:
        s = layers[0].spec
        table.add_row("layer 0 experts", f"shared {s.shared_size} + {s.num_experts} x {s.expert_size}, top {s.top_k}")
    table.add_row("parameters", f"{p.total:,}")
    table.add_row("FFN parameters", f"{p.ffn:,}")
    table.add_row("activated FFN fraction", f"{p.ffn_active_fraction:.1%}")
    table.add_row("activated fraction of all parameters", f"{p.active_fraction:.1%}")
    table.add_row("router parameters", f"{p.router:,} ({p.router / p.total:.3%})")
    return table
