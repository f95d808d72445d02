"""cmoe: convert a dense Hugging Face causal LM into a CMoE mixture of experts, training-free.

    import cmoe
    model, tok = cmoe.load_model("smollm2")                 # hub id, folder, .gguf or built-in
    report = cmoe.convert_(model, cmoe.CMoEConfig.parse("S3A3E8"), calib_ids)
    cmoe.save(model, "out/", tokenizer=tok)
    model = cmoe.load("out/")                               # or AutoModelForCausalLM.from_pretrained
"""

from . import data, evaluate
from .checkpoint import CheckpointError, load, load_tokenizer, register_all, save
from .config import CMoEConfig, ConfigError
from .convert import ConversionReport, convert_
from .families import FAMILIES, UnsupportedModelError
from .loading import load_model
from .moe import CMoEMLP, MoELayerSpec, moe_layers, set_expert_impl

register_all()

__version__ = "0.1.0"

__all__ = [
    "CMoEConfig",
    "CMoEMLP",
    "CheckpointError",
    "ConfigError",
    "ConversionReport",
    "FAMILIES",
    "MoELayerSpec",
    "UnsupportedModelError",
    "convert_",
    "load",
    "load_model",
    "load_tokenizer",
    "moe_layers",
    "save",
    "set_expert_impl",
    "__version__",
    "data",
    "evaluate",
]
