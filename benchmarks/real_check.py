"""Real-model check of one family: dense vs CMoE perplexity and a generation, on this CPU.

    python benchmarks/real_check.py gemma3-270m --config S3A3E8 --recipe paper
    python benchmarks/real_check.py smollm2

Calibration: --samples x --seqlen tokens of the wiki calibration split; evaluation: the first
--windows windows of --seqlen tokens of held-out wiki and c4.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import cmoe
from cmoe import data, evaluate
from cmoe.pipeline import sample_text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--config", default="S3A3E8")
    p.add_argument("--recipe", default="paper")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    dense, tok = cmoe.load_model(args.model, dtype="float32")
    load_s = time.perf_counter() - t0
    ids = data.calibration_tokens(tok, "wiki", args.samples, args.seqlen)
    model = copy.deepcopy(dense)
    cfg = cmoe.CMoEConfig.parse(args.config, recipe=args.recipe, calib_samples=args.samples, calib_seqlen=args.seqlen)
    report = cmoe.convert_(model, cfg, ids, device="cpu")
    ppl = evaluate.compare_perplexity({"dense": dense, cfg.name: model}, tok, ["wiki", "c4"], args.seqlen, args.windows)
    print(f"\n{args.model} ({dense.config.model_type}, {len(report.layers)} layers), {cfg.name} recipe {cfg.recipe}: "
          f"load {load_s:.1f} s, convert {report.seconds:.1f} s on {args.samples} x {args.seqlen} tokens")
    print(evaluate.format_table(ppl, title=f"held-out perplexity ({args.windows} x {args.seqlen} tokens)"))
    for name, m in (("dense", dense), (cfg.name, model)):
        print(f"{name}: The capital of France is{sample_text(m, tok, 'The capital of France is', 16)!r}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
