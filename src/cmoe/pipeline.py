"""Thin workflows on top of ``convert_``: load -> calibrate -> convert -> save -> evaluate.

The CLI calls these; they hold no algorithm of their own.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, data
from .config import CMoEConfig
from .convert import ConversionReport, convert_
from .loading import DEMO_MODEL, load_model

REPORT_FILE = "cmoe_report.json"


@dataclass
class Converted:
    model: torch.nn.Module
    tokenizer: object
    report: ConversionReport
    dense: torch.nn.Module | None = None  # kept only when asked (for side-by-side evaluation)


def convert(
    model: str = DEMO_MODEL,
    config: CMoEConfig | str = "S3A3E8",
    calib: str = "wiki",
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    keep_dense: bool = False,
    progress: bool = True,
) -> Converted:
    """Load ``model``, calibrate on ``calib``, convert, and save to ``out`` (if given)."""
    cfg = CMoEConfig.parse(config) if isinstance(config, str) else config
    if out is not None:
        checkpoint.check_output_dir(out, overwrite)  # fail before the slow part
    dense, tokenizer = load_model(model, dtype=dtype)
    ids = data.calibration_tokens(tokenizer, calib, cfg.calib_samples, cfg.calib_seqlen, seed=cfg.seed)
    converted = copy.deepcopy(dense) if keep_dense else dense
    report = convert_(converted, cfg, ids, device=device, progress=progress)
    converted.config.cmoe["source"] = {"model": model, "calib": calib}
    if out is not None:
        report_json = json.dumps(report.to_dict(), indent=2) + "\n"
        checkpoint.save(converted, out, tokenizer=tokenizer, overwrite=overwrite, files={REPORT_FILE: report_json})
    return Converted(converted, tokenizer, report, dense if keep_dense else None)


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
