"""Perplexity on token windows, and a side-by-side comparison of several models.

Protocol (GPTQ/SparseGPT style): each window [seqlen] is evaluated independently; the loss is
the next-token NLL over positions 1..seqlen-1, averaged over all predicted tokens of all
windows; perplexity = exp(mean NLL). Windows come from ``cmoe.data.eval_windows``.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from .data import eval_windows

LOSS_CHUNK = 1024  # positions whose logits are upcast to float32 at once


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL in float32, chunked over positions: logits [b, L, V], ids [b, L]."""
    target = ids[:, 1:].to(logits.device)  # [b, L-1]
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        for i in range(0, target.shape[1], LOSS_CHUNK):
            chunk = logits[row, i : min(i + LOSS_CHUNK, target.shape[1])].float()  # [c, V]
            total += F.cross_entropy(chunk, target[row, i : i + LOSS_CHUNK], reduction="sum").double()
    return total


@torch.inference_mode()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 1, device=None, desc: str = "ppl", progress: bool = True
) -> float:
    """exp(mean next-token NLL) of ``model`` over ``windows`` (LongTensor [n, seqlen], seqlen >= 2).

    Inputs go to ``device`` (default: the model's device); the model runs in eval mode and its
    previous train/eval mode is restored. Only one batch's logits are alive at a time.
    """
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n>=1, seqlen>=2] token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # on device: no sync per batch
    try:
        for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            ids = windows[i : i + batch_size].to(device)  # [b, seqlen]
            out = model(input_ids=ids, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]  # [b, seqlen, V]
            total += _nll_sum(logits, ids).to(device)
            del out, logits
    finally:
        model.train(was_training)
    count = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(total.item() / count)


def compare_perplexity(
    models: dict, tokenizer, sources: list[str], seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1
) -> dict[str, dict[str, float]]:
    """``{source: {model_name: ppl}}`` with the same windows for every model."""
    results: dict[str, dict[str, float]] = {}
    for source in sources:
        windows = eval_windows(tokenizer, source, seqlen, max_windows)  # [n, seqlen]
        results[source] = {
            name: perplexity(model, windows, batch_size, desc=f"{name} {source}") for name, model in models.items()
        }
    return results


def format_table(results: dict[str, dict[str, float]], title: str = "perplexity") -> str:
    """Render ``compare_perplexity``'s results: rows = sources, columns = models, then each
    later model's ratio to the first one. Returns plain text (rich table, no colour codes)."""
    names = list(dict.fromkeys(name for row in results.values() for name in row))
    table = Table(title=title)
    table.add_column("source")
    for name in names:
        table.add_column(name, justify="right")
    for name in names[1:]:
        table.add_column(f"{name} / {names[0]}", justify="right")
    for source, row in results.items():
        ppl = [f"{row[n]:.3f}" if n in row else "-" for n in names]
        base = row.get(names[0]) if names else None
        ratios = [f"{row[n] / base:.3f}x" if base and n in row else "-" for n in names[1:]]
        table.add_row(source, *ppl, *ratios)
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue().rstrip() + "\n"
