"""Checkpoints: save_pretrained-style folders that Hugging Face loads natively.

A converted model is saved with ``model_type = "cmoe_<family>"`` (e.g. ``cmoe_llama``) and the
per-layer MoE shapes under ``config.json["cmoe"]``. ``import cmoe`` registers, for every
supported family, a config class and a CausalLM class with those names in transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(path)`` works without
trust_remote_code. Weights are safetensors only (no pickle). Saving is atomic: the folder
is written under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .families import FAMILIES, family_of
from .moe import CMoEMLP, MoELayerSpec

PREFIX = "cmoe_"
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")


class CheckpointError(OSError):
    """The output folder cannot take a checkpoint, or a folder is not a cmoe checkpoint."""


def install_moe_layers(model: nn.Module, cmoe: dict) -> None:
    """Replace each decoder layer's FFN by an (empty) CMoEMLP of the saved shape."""
    family = family_of(model.config)
    layers = family.layers(model)
    specs = cmoe["layers"]
    if len(specs) != len(layers):
        raise CheckpointError(f"config has {len(specs)} MoE layer specs for {len(layers)} decoder layers")
    for layer, spec in zip(layers, specs):
        old = getattr(layer, family.mlp_attr)
        ref = next(old.parameters())
        setattr(layer, family.mlp_attr, CMoEMLP(MoELayerSpec(**spec)).to(device=ref.device, dtype=ref.dtype))


def _register(model_type: str) -> None:
    base_config = CONFIG_MAPPING[model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    config_cls = type(f"CMoE{base_config.__name__}", (base_config,), {"model_type": PREFIX + model_type})

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        install_moe_layers(self, config.cmoe)

    model_cls = type(f"CMoE{base_model.__name__}", (base_model,), {"config_class": config_cls, "__init__": __init__})
    model_cls.__module__ = config_cls.__module__ = __name__
    globals()[model_cls.__name__] = model_cls
    globals()[config_cls.__name__] = config_cls
    AutoConfig.register(PREFIX + model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def register_all() -> None:
    for model_type in FAMILIES:
        _register(model_type)


def is_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type", "").startswith(PREFIX)


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early, before any work: the folder must be writable and not hold a checkpoint."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty; pass --overwrite (overwrite=True) to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write to {parent}: choose an output folder you can write to")
    return out


def save(
    model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False, files: dict[str, str] | None = None
) -> Path:
    """Save a converted model (its tokenizer, and extra text ``files`` by name) to ``out``, atomically."""
    if not getattr(model.config, "cmoe", None):
        raise CheckpointError("model is not converted (config.cmoe is missing); run cmoe.convert_ first")
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        base = cfg["model_type"].removeprefix(PREFIX)
        cfg["model_type"] = PREFIX + base
        cfg["architectures"] = [f"CMoE{MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[base]].__name__}"]
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        _default_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder; give the checkpoint the permissions of any new folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load a cmoe checkpoint -> model (eval mode). ``cmoe.load_tokenizer(path)`` for its tokenizer."""
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a cmoe checkpoint (no config.json with model_type cmoe_*)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    if device:
        model.to(device)
    _align_cpu_tensors_(model)
    return model.eval()


CPU_ALIGN = 64  # bytes: torch's CPU allocator's alignment


def _align_cpu_tensors_(model) -> None:
    """Copy the CPU parameters and buffers that do not start on a CPU_ALIGN boundary into memory
    that does. transformers (5.2x) can leave CPU tensors as views of the mapped safetensors file,
    at the file's 8-byte-aligned offsets; torch's CPU kernels (grouped_mm among them) may round
    differently there than on aligned memory, so that the reloaded model's logits differed from
    the saved model's in the last bit (torch 2.14.1). Tied weights are one parameter: copied once."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % CPU_ALIGN:
            t.data = t.data.clone()


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)
