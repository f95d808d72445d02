"""cmoe: convert a dense Hugging Face causal LM into a CMoE mixture of experts, training-free."""

from .moe import CMoEMLP, MoELayerSpec, moe_layers, set_expert_impl

__version__ = "0.1.0"

__all__ = ["CMoEMLP", "MoELayerSpec", "moe_layers", "set_expert_impl", "__version__"]
