"""Conversion time and peak memory.

    python benchmarks/bench_convert.py smollm2 --device cpu            # the real SmolLM2 on this CPU
    python benchmarks/bench_convert.py llama2-7b --device cuda         # random LLaMA-2-7B shape, bf16

For the synthetic shapes the model is built with random weights directly on the GPU (fast
init), then moved to the CPU, so the conversion itself shows the offloaded regime: only the
layer being converted and its activations live on the GPU. Prints one table row per run and
the hardware.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cmoe
from cmoe.bench import MODELS

SHAPES = {name: {k: v for k, v in cfg.items() if k != "max_position_embeddings"} for name, cfg in MODELS.items()}


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def random_model(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    init = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.to("cpu").eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["smollm2", *SHAPES])
    p.add_argument("--config", default="S3A3E8")
    p.add_argument("--recipe", default=None, help="paper or plus (default: CMoEConfig's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if args.model == "smollm2":
        model, tok = cmoe.load_model("smollm2", dtype="float32")
        ids = cmoe.data.calibration_tokens(tok, "wiki", args.samples, args.seqlen)
    else:
        model = random_model(args.model, torch.bfloat16)
        ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seqlen),
                            generator=torch.Generator().manual_seed(0))
    load_s = time.perf_counter() - t0
    extra = {"recipe": args.recipe} if args.recipe else {}
    cfg = cmoe.CMoEConfig.parse(args.config, calib_samples=args.samples, calib_seqlen=args.seqlen, **extra)
    report = cmoe.convert_(model, cfg, ids, device=args.device, batch_size=args.batch_size)
    per_layer = sorted(r.seconds for r in report.layers)
    print(f"\nhardware: {hardware(args.device)}")
    print(f"| model | config | recipe | calib tokens | device | load s | convert s | median s/layer | peak memory GiB |")
    print(f"|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {cfg.name} | {cfg.recipe} | {args.samples} x {args.seqlen} | {args.device} | {load_s:.1f} | "
          f"{report.seconds:.1f} | {per_layer[len(per_layer) // 2]:.2f} | {report.peak_memory_bytes / 2**30:.2f} |")


if __name__ == "__main__":
    main()
