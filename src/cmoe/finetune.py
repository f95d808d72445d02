"""Optional lightweight fine-tuning of a converted model (method.md section 6).

    model, tok = cmoe.load_model("out/")                      # a cmoe checkpoint
    result = cmoe.finetune.finetune(model, tok, data="wiki", samples=2048, seqlen=2048, out="out-ft/")

What is trained, everything else frozen:

- LoRA through peft (r=8, alpha=32) on the attention projections (q, k, v, o; Phi-3's fused
  ``qkv_proj``), on the shared expert's ``shared_gate_up``/``shared_down`` (nn.Linear, LoRA
  dropout 0.1), and on every routed expert's stacked ``experts.gate_up_proj [E, 2m, d]`` and
  ``experts.down_proj [E, d, m]`` (peft ``target_parameters``: a rank-r pair per expert; peft
  applies it inside the call of ``moe.RoutedExperts``, which owns the stacked weights). peft
  cannot apply dropout to a LoRA on a weight tensor (its ParamWrapper refuses
  ``lora_dropout != 0``), so the expert LoRA is a second adapter with dropout 0; both are active.
- The router scale v (``router.scale``), at its own learning rate (1e-3), no weight decay. Its
  gradient reaches it through the chosen experts' weights ``1 + p_j(x) * v_j``.
- The load-balancing bias b (``router.bias``) gets no gradient: after every optimizer step,
  ``b_j += gamma`` for experts that received fewer tokens than the mean in that step and
  ``b_j -= gamma`` for those that received more (``CMoEMLP.collect_load``/``expert_load``).

AdamW with betas (0.9, 0.95), lr 5.6e-5, no weight decay (= Adam), constant learning rate, 1
epoch. Precision: float32 on the CPU; on a GPU the frozen weights are bfloat16 while the
trainable tensors (LoRA, v, b) stay float32 (no autocast: it would push the router's float32
scores down to bfloat16). Routed experts run with ``FinetuneConfig.impl`` (default "auto":
"grouped" on the CPU and for bf16 on CUDA, whose ``torch._grouped_mm`` has a backward, checked
against "loop"; the Triton kernels have none and "auto" skips them while gradients are needed).
"grouped" needs 16-byte aligned expert rows (expert size m a multiple of 8 in bf16, of 4 in
float32); use impl="loop" for other shapes.

At the end the LoRA is merged into the weights (``merge_and_unload``) and the model is an
ordinary converted model again: ``cmoe.save`` it, or let :func:`finetune` save it.

Resume: with a ``state_dir``, every ``save_every`` optimizer steps one file,
``state.safetensors``, is written (to a temporary name, then renamed over the old one, so an
interrupted run never leaves a half-written state). It holds the LoRA weights, v and b, the
optimizer state (its tensors as safetensors, the rest as JSON in the file's metadata), the
step, the losses so far, the RNG states and a fingerprint of the data and of the settings (the
data order is a function of the seed and the epoch). ``resume=True`` continues from it and
gives the same final weights as a run that was never interrupted (bit for bit on the CPU; on
CUDA up to the order of atomic additions).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError
from .moe import CMoEMLP, moe_layers

STATE_FILE = "state.safetensors"
FINETUNE_FILE = "cmoe_finetune.json"  # the report (loss and load-imbalance curves) saved with the checkpoint
STATE_FORMAT = 1
LINEAR_ADAPTER = "cmoe_lora"  # attention + shared expert (nn.Linear), with dropout
EXPERTS_ADAPTER = "cmoe_experts"  # stacked routed-expert weights, no dropout (peft cannot)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


class FinetuneError(ConfigError):
    """Fine-tuning cannot run as asked; the message says why and what to change."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune_ids` (defaults: method.md section 6)."""

    lr: float = 5.6e-5  # LoRA
    router_lr: float = 1e-3  # router scale v
    gamma: float = 1e-3  # load-balancing bias step; 0 = no bias update
    epochs: int = 1
    batch_size: int = 1  # sequences per forward
    grad_accum: int = 1  # forwards per optimizer step
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1  # attention and shared expert; the routed experts' LoRA has none
    attention: tuple[str, ...] = ATTENTION  # names of the attention projections to adapt
    shared: bool = True  # LoRA on the shared expert
    experts: bool = True  # LoRA on every routed expert (stacked)
    router_scale: bool = True  # train v
    max_grad_norm: float | None = None  # clip the global gradient norm (paper: none)
    grad_checkpointing: bool = False
    impl: str = "auto"  # routed-expert implementation while training (needs a backward: not "triton")
    save_every: int = 100  # optimizer steps between resumable states (with a state_dir); 0 = never
    seed: int = 0  # data order and LoRA dropout

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "attention", tuple(self.attention))
        checks = [
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.router_lr >= 0, f"router_lr={self.router_lr} must be >= 0"),
            (self.gamma >= 0, f"gamma={self.gamma} must be >= 0"),
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas={self.betas}: 2 numbers in [0, 1)"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (self.lora_r >= 1, f"lora_r={self.lora_r} must be >= 1"),
            (self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0"),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm={self.max_grad_norm} must be > 0"),
            (self.save_every >= 0, f"save_every={self.save_every} must be >= 0 (0 = never)"),
            (self.impl != "triton", 'impl="triton" has no backward; use "auto", "grouped", "gather" or "loop"'),
        ]
        for ok, msg in checks:
            if not ok:
                raise FinetuneError(msg)

    def to_dict(self) -> dict:
        return asdict(self)

    def trajectory(self) -> dict:
        """The settings that change the result (a resumed run must match them)."""
        return {k: v for k, v in asdict(self).items() if k not in ("save_every", "grad_checkpointing")}


@dataclass
class FinetuneReport:
    config: dict
    steps: int = 0  # optimizer steps taken in total (including those before a resume)
    tokens: int = 0  # tokens trained on
    seconds: float = 0.0  # wall time of this call (excluding work before a resume)
    resumed_from: int = 0  # step the run resumed from (0: fresh)
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss of each step
    imbalance: list[float] = field(default_factory=list)  # max/mean expert load, mean over layers, each step

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- model set-up


def _lora_targets(model: nn.Module, cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """Full names of the nn.Linear modules and of the stacked expert parameters to adapt."""
    linear = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or min(mod.weight.shape) == 0:
            continue
        leaf = name.rpartition(".")[2]
        if leaf in cfg.attention or (cfg.shared and leaf in ("shared_gate_up", "shared_down")):
            linear.append(name)
    params = []
    if cfg.experts:
        for name, mod in model.named_modules():
            if isinstance(mod, CMoEMLP) and mod.spec.num_experts > 0 and mod.spec.top_k > 0:
                params += [f"{name}.experts.gate_up_proj", f"{name}.experts.down_proj"]
    return linear, params


def add_lora(model: nn.Module, config: FinetuneConfig | None = None):
    """Wrap a converted model for training: peft LoRA adapters, v trainable, all else frozen.

    Returns the ``peft.PeftModel``. The trainable tensors are float32 whatever the model's dtype.
    ``merge(peft_model)`` undoes the wrapping.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FinetuneError("fine-tuning needs peft >= 0.17: pip install 'cmoe[finetune]'") from None
    cfg = config or FinetuneConfig()
    layers = moe_layers(model)
    if not layers:
        raise FinetuneError("the model has no CMoE layers: convert it first (cmoe convert / cmoe.convert_)")
    linear, params = _lora_targets(model, cfg)
    if not (linear or params or cfg.router_scale):
        raise FinetuneError(
            "no trainable parameters: no attention projection named any of "
            f"{list(cfg.attention)} was found, and the shared expert, the routed experts and the "
            "router scale are all switched off"
        )
    model._cmoe_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    lora = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, bias="none")
    adapters = {}
    if linear:
        adapters[LINEAR_ADAPTER] = LoraConfig(**lora, target_modules=linear, lora_dropout=cfg.lora_dropout)
    if params:
        adapters[EXPERTS_ADAPTER] = LoraConfig(**lora, target_modules=[], target_parameters=params, lora_dropout=0.0)
    if adapters:
        (first, conf), *rest = adapters.items()
        peft_model = get_peft_model(model, conf, adapter_name=first)
        for name, conf in rest:
            peft_model.add_adapter(name, conf)
        peft_model.base_model.set_adapter(list(adapters))  # all active, all trainable
    else:  # only the router scale is trained
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = model
    for m in layers:
        m.router.bias.data = m.router.bias.data.float()  # b: no gradient, float32 while training
        m.router.scale.data = m.router.scale.data.float()
        m.router.scale.requires_grad_(cfg.router_scale)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model._cmoe_adapters = list(adapters)
    return peft_model


def merge(peft_model, discard: bool = False) -> nn.Module:
    """Merge the LoRA adapters into the weights (``discard``: drop them) and return the plain
    converted model. v and b go back to the model's dtype; ``requires_grad`` flags are restored."""
    if hasattr(peft_model, "merge_and_unload"):
        adapters = peft_model.base_model.model._cmoe_adapters
        model = peft_model.unload() if discard else peft_model.merge_and_unload(adapter_names=adapters)
    else:
        model = peft_model
    layers = moe_layers(model)
    dtype = layers[0].shared_gate_up.weight.dtype
    for m in layers:
        m.router.scale.data = m.router.scale.data.to(dtype)
        m.router.bias.data = m.router.bias.data.to(dtype)
    flags = model.__dict__.pop("_cmoe_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    model.__dict__.pop("_cmoe_adapters", None)
    return model


def trainable_parameters(peft_model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def _optimizer(peft_model, cfg: FinetuneConfig) -> tuple[torch.optim.Optimizer, list[str]]:
    named = trainable_parameters(peft_model)
    scale = [n for n in named if n.endswith("router.scale")]
    lora = [n for n in named if n not in scale]
    groups, order = [], []
    if lora:
        groups.append({"params": [named[n] for n in lora], "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        order += lora
    if scale:
        groups.append({"params": [named[n] for n in scale], "lr": cfg.router_lr, "weight_decay": 0.0})
        order += scale
    return torch.optim.AdamW(groups, betas=cfg.betas), order


# --------------------------------------------------------------------------- load balancing


def _loads(layers: list[CMoEMLP]) -> torch.Tensor:
    return torch.stack([m.expert_load for m in layers]).float()  # [L, E]


@torch.no_grad()
def update_bias(layers: list[CMoEMLP], gamma: float) -> torch.Tensor:
    """b_j += gamma where expert j got fewer tokens than the mean since the last reset, -= gamma
    where more (no change at exactly the mean). Returns the loads [L, E] and resets them."""
    load = _loads(layers)  # [L, E]
    step = gamma * torch.sign(load.mean(1, keepdim=True) - load)  # [L, E]
    for m, s in zip(layers, step):
        m.router.bias += s.to(m.router.bias)
        m.expert_load.zero_()
    return load


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """max / mean tokens per expert, averaged over layers (1 = perfectly balanced)."""
    return (load.max(1).values / load.mean(1).clamp_min(1e-9)).mean()


# --------------------------------------------------------------------------- resumable state


def _fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def save_state(path: Path, peft_model, optimizer, names: list[str], meta: dict) -> None:
    """One safetensors file; non-tensor state as JSON in its metadata. Written atomically."""
    from safetensors.torch import save_file

    tensors = {}
    params = trainable_parameters(peft_model)
    for n in names:
        tensors[f"param/{n}"] = params[n].detach()
    for n, b in peft_model.named_buffers():
        if n.endswith("router.bias"):
            tensors[f"buffer/{n}"] = b
    opt = optimizer.state_dict()
    scalars: dict = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {
        **meta,
        "format": STATE_FORMAT,
        "param_names": names,
        "optim": {"param_groups": opt["param_groups"], "scalars": scalars},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"cmoe_finetune": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_state_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["cmoe_finetune"])


def load_state(path: Path, peft_model, optimizer, names: list[str], expect: dict) -> dict:
    """Restore what :func:`save_state` wrote; checks it belongs to this run. Returns its metadata."""
    from safetensors.torch import load_file

    meta = read_state_meta(path)
    for key in ("config", "data"):
        if meta.get(key) != expect[key]:
            raise FinetuneError(
                f"the saved state in {path} was made with a different {key} ({meta.get(key)} vs now "
                f"{expect[key]}); resume with the same settings, or delete {path} to start over"
            )
    if meta["param_names"] != names:
        raise FinetuneError(f"the saved state in {path} has other trainable parameters than this model")
    tensors = load_file(str(path))
    params = trainable_parameters(peft_model)
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[f"param/{n}"])
        for n, b in peft_model.named_buffers():
            if f"buffer/{n}" in tensors:
                b.copy_(tensors[f"buffer/{n}"])
    groups = meta["optim"]["param_groups"]
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = t
    for idx, st in meta["optim"]["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    for g in groups:
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[f"rng/cuda/{i}"] for i in range(sum(k.startswith("rng/cuda/") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return meta


# --------------------------------------------------------------------------- training


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def finetune_ids(
    model: nn.Module,
    ids: torch.Tensor,
    config: FinetuneConfig | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    callback: Callable[[int, float, float], None] | None = None,
) -> FinetuneReport:
    """Fine-tune a converted ``model`` in place on token ids ``[N, S]``; LoRA is merged at the end.

    ``device`` (default: CUDA if available) and ``dtype`` (default: bfloat16 on CUDA, float32 on
    the CPU) are where and how the frozen weights live; the model is moved there. With
    ``state_dir``, a resumable state is saved every ``config.save_every`` steps and
    ``resume=True`` continues from it (an existing state without ``resume`` is an error, so
    that a run is never silently restarted). ``callback(step, loss, imbalance)`` is called after
    every optimizer step; an exception raised there stops the run (the last saved state stays).
    """
    cfg = config or FinetuneConfig()
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise FinetuneError(f"training ids must be a LongTensor [N >= 1, S >= 2], got {shape}")
    ids = ids.long().cpu()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and ids.shape[1] > max_pos:
        raise FinetuneError(f"seqlen={ids.shape[1]} is longer than the model's max_position_embeddings={max_pos}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and int(ids.max()) >= vocab:
        raise FinetuneError(f"token id {int(ids.max())} is out of the model's vocabulary ({vocab}): wrong tokenizer?")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise FinetuneError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    if state_path is not None and state_path.exists() and not resume:
        raise FinetuneError(
            f"a saved fine-tuning state exists in {state_dir} (step {read_state_meta(state_path)['step']}); "
            "pass resume=True (--resume) to continue it, or delete it to start over"
        )
    if resume and state_path is None:
        raise FinetuneError("resume=True needs a state_dir (where the resumable state is saved)")

    n, seqlen = ids.shape
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(n / per_step)
    total = cfg.epochs * steps_per_epoch
    expect = {"config": cfg.trajectory(), "data": {"n": n, "seqlen": seqlen, "sha256": _fingerprint(ids)}}
    expect = json.loads(json.dumps(expect))  # as it reads back from the state file
    model.to(device=device, dtype=dtype)
    gc_was = getattr(model, "is_activation_checkpointing", None)
    gc_was = bool(gc_was if gc_was is not None else getattr(model, "is_gradient_checkpointing", False))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # LoRA init and dropout; the caller's RNG is left alone
        peft_model = add_lora(model, cfg)
        layers = moe_layers(peft_model)
        collect = [(m.collect_load, m.impl) for m in layers]
        initial = [(m.router.scale.detach().clone(), m.router.bias.clone()) for m in layers]
        optimizer, names = _optimizer(peft_model, cfg)
        report = FinetuneReport(cfg.to_dict())
        report.trainable_parameters = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        try:
            for m in layers:
                m.collect_load, m.impl = True, cfg.impl
                m.expert_load.zero_()
            if cfg.grad_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            step = 0
            if resume and state_path.exists():
                meta = load_state(state_path, peft_model, optimizer, names, expect)
                step = report.resumed_from = meta["step"]
                report.losses, report.imbalance = meta["losses"], meta["imbalance"]
                report.tokens = meta["tokens"]
            peft_model.train()
            bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not progress)
            while step < total:
                epoch, i = divmod(step, steps_per_epoch)
                rows = _order(n, cfg.seed, epoch)[i * per_step : (i + 1) * per_step]
                loss_sum = torch.zeros((), device=device, dtype=torch.float32)
                for mb in rows.split(cfg.batch_size):
                    x = ids[mb].to(device)
                    loss = peft_model(input_ids=x, labels=x, use_cache=False).loss
                    share = mb.numel() / rows.numel()  # every sequence has the same length
                    (loss * share).backward()
                    loss_sum += loss.detach().float() * share
                if cfg.max_grad_norm:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                load = update_bias(layers, cfg.gamma)  # [L, E]
                step += 1
                loss_val, imb = float(loss_sum), float(imbalance(load))  # one host sync per step
                report.losses.append(loss_val)
                report.imbalance.append(imb)
                report.tokens += rows.numel() * seqlen
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", imbalance=f"{imb:.2f}")
                if state_path is not None and cfg.save_every and (step % cfg.save_every == 0 or step == total):
                    meta = {**expect, "step": step, "tokens": report.tokens, "losses": report.losses,
                            "imbalance": report.imbalance}
                    save_state(state_path, peft_model, optimizer, names, meta)
                if callback is not None:
                    callback(step, loss_val, imb)
            bar.close()
            report.steps = step
        except BaseException:  # leave the caller's model as it was (the saved state stays)
            merge(peft_model, discard=True)
            with torch.no_grad():
                for m, (v, b) in zip(layers, initial):
                    m.router.scale.copy_(v)
                    m.router.bias.copy_(b)
            raise
        else:
            merge(peft_model.eval())
        finally:
            if cfg.grad_checkpointing and not gc_was:
                model.gradient_checkpointing_disable()
            for m, (c, impl) in zip(layers, collect):
                m.collect_load, m.impl = c, impl
    model.eval()
    report.seconds = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------- workflow


@dataclass
class Finetuned:
    model: nn.Module
    tokenizer: object
    report: FinetuneReport
    out: Path | None = None


def state_dir_for(out: str | Path) -> Path:
    """Where :func:`finetune` keeps the resumable state of a run saving to ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".ft-state")


def finetune(
    model: nn.Module | str,
    tokenizer=None,
    data: str = "wiki",
    samples: int = 2048,
    seqlen: int = 2048,
    out: str | Path | None = None,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    data_seed: int = 1,
    progress: bool = True,
    **overrides,
) -> Finetuned:
    """Fine-tune a converted model on ``samples`` windows of ``seqlen`` tokens of ``data`` and
    save the merged result to ``out`` (an ordinary cmoe checkpoint; atomic).

    ``model``: a converted model (with ``tokenizer``) or the path of a cmoe checkpoint.
    ``data``: any ``cmoe.data`` source (calibration split; ``data_seed`` picks the windows).
    ``config`` or keyword ``overrides`` (``lr=..., epochs=...``): :class:`FinetuneConfig`.
    The resumable state lives next to ``out`` (:func:`state_dir_for`) and is removed once the
    checkpoint is saved.
    """
    from . import checkpoint, data as data_mod
    from .loading import load_model
    from .pipeline import REPORT_FILE

    try:
        cfg = config or FinetuneConfig(**overrides)
    except TypeError as e:
        known = ", ".join(f.name for f in fields(FinetuneConfig))
        raise FinetuneError(f"{e}; FinetuneConfig fields: {known}") from None
    if config is not None and overrides:
        raise FinetuneError("pass either config or keyword overrides, not both")
    if out is not None:
        checkpoint.check_output_dir(out, overwrite)  # fail before the slow part
    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        model, tok = load_model(source, dtype=dtype)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise FinetuneError("a tokenizer is needed to read the training text")
    if not moe_layers(model):
        raise FinetuneError(f"{source or 'the model'} is not a CMoE model: convert it first (cmoe convert)")
    ids = data_mod.calibration_tokens(tokenizer, data, samples, seqlen, seed=data_seed)
    state_dir = state_dir_for(out) if out is not None else None
    report = finetune_ids(model, ids, cfg, state_dir=state_dir, resume=resume, device=device, dtype=dtype,
                          progress=progress)
    model.config.cmoe["finetune"] = {
        "data": data, "samples": samples, "seqlen": seqlen, "data_seed": data_seed, "steps": report.steps,
        "seconds": round(report.seconds, 1), "final_loss": report.losses[-1] if report.losses else None,
        **cfg.to_dict(),
    }
    out_path = None
    if out is not None:
        files = {FINETUNE_FILE: json.dumps(report.to_dict(), indent=2) + "\n"}
        if source is not None and (Path(source) / REPORT_FILE).is_file():  # keep the conversion report
            files[REPORT_FILE] = (Path(source) / REPORT_FILE).read_text()
        out_path = checkpoint.save(model, out, tokenizer=tokenizer, overwrite=overwrite, files=files)
        shutil.rmtree(state_dir, ignore_errors=True)
    return Finetuned(model, tokenizer, report, out_path)
