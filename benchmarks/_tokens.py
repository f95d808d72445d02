"""Shared by the perplexity benchmarks: calibration ids and eval windows, tokenised here or read
from a file written by ``--save-tokens`` (so a GPU machine needs no tokenizer and no text).

File layout (safetensors): ``calib`` (the default calibration set), ``calib:<source>:<n>`` (other
calibration sets), ``eval.<source>`` (held-out windows).
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file, save_file

from cmoe import data
from cmoe.loading import load_tokenizer


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sources", default="wiki,c4,ptb")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smollm2", help="model to load (default: the built-in SmolLM2 GGUF)")
    p.add_argument("--save-tokens", help="only write the calibration ids and eval windows to this safetensors file")
    p.add_argument("--tokens", help="read calibration ids and eval windows from this file (no tokenizer, no text)")


def calib_key(source: str, samples: int, args) -> str:
    return "calib" if (source, samples) == (args.calib, args.samples) else f"calib:{source}:{samples}"


def get_tokens(args, extra_calib: list[tuple[str, int]] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (calibration ids by key, eval windows by source); writes them and exits with --save-tokens."""
    sources = args.sources.split(",")
    wanted = [(args.calib, args.samples), *extra_calib]
    if args.tokens:
        saved = load_file(args.tokens)
        calib = {calib_key(s, n, args): saved[calib_key(s, n, args)] for s, n in wanted}
        windows = {s: saved[f"eval.{s}"][: args.windows] for s in sources}
    else:
        tok = load_tokenizer(args.model)
        windows = {s: data.eval_windows(tok, s, args.seqlen, args.windows) for s in sources}
        calib = {calib_key(s, n, args): data.calibration_tokens(tok, s, n, args.seqlen) for s, n in wanted}
    if args.save_tokens:
        save_file({**{k: v.contiguous() for k, v in calib.items()},
                   **{f"eval.{s}": w.contiguous() for s, w in windows.items()}}, args.save_tokens)
        raise SystemExit(0)
    return calib, windows
