"""The ``cmoe`` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(soft_wrap=True)  # tables are pre-rendered: never re-wrap them

DEMO_PROMPT = "The history of the Roman Empire"


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a dense model into a CMoE model (no MODEL: the built-in SmolLM2 demo)",
        description="Convert a dense causal LM into a CMoE mixture of experts, training-free. "
        "With no MODEL, runs the built-in demo: SmolLM2-135M-Instruct, calibration on the wiki "
        "sample, S3A3E8, then dense vs converted perplexity on held-out wiki and c4 and a sample "
        "generation from each.",
    )
    p.add_argument("model", nargs="?", help="hub id, local folder, .gguf file, or 'smollm2' (default: the demo)")
    p.add_argument("--config", default="S3A3E8", help="S{s}A{a}E{e}: s shared, a active of e experts (default S3A3E8)")
    p.add_argument("--calib", default="wiki", help="calibration source: wiki, c4, ptb, code, a+b mixtures, hf:NAME, file")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences (default 8)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration sequence length (default 2048)")
    p.add_argument("--k-act", type=int, default=10, help="K_a of the ATopK markers (default 10)")
    p.add_argument("--kmeans-iters", type=int, default=None, help="balanced k-means iterations; 0 = to convergence (default: the recipe's)")
    p.add_argument("--recipe", default=None, help="algorithm bundle: plus (default: contribution features, "
                   "k-means to convergence, fitted linear router, down refit) or paper (the paper's algorithm exactly)")
    p.add_argument("--router", default=None, help="analytical or linear (ridge-fitted to expert output norms); default: the recipe's")
    p.add_argument("--features", default=None, help="neuron features for the partition: markers (paper) or contrib; default: the recipe's")
    p.add_argument("--ridge", type=float, default=None, help="linear router ridge strength (default 1e-2)")
    p.add_argument("--refit", default=None, help="none or down (least-squares down projections under the "
                   "routing, cmoe.refit); default: the recipe's")
    p.add_argument("--refit-ridge", type=float, default=None, help="ridge strength of the down refit (default 0.6)")
    p.add_argument("--refit-stream", type=float, default=None, help="0-1: how far the down refit's target moves from "
                   "the dense FFN's output toward the dense model's next hidden state (default: the recipe's, plus 0.5)")
    p.add_argument("--allocation", default=None, help="uniform (every layer SsAaEe) or sensitivity (the config's "
                   "activated fraction spread over layers by measured sensitivity); default: the recipe's")
    p.add_argument("--budget", type=float, default=None, help="model-wide activated FFN fraction spread over layers by "
                   "measured sensitivity (e.g. 0.5; --config then only sets the number of experts)")
    p.add_argument("--min-active", type=float, default=None, help="with --budget: lowest activated fraction of a layer (default 0.125)")
    p.add_argument("--max-active", type=float, default=None, help="with --budget: highest activated fraction of a layer (default 1: dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder for the checkpoint (refuses a non-empty one without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--device", help="compute device for each layer (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="model dtype: float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--eval", default=None, help="after converting, perplexity dense vs converted on these sources (e.g. wiki,c4)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows per source (default 8)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> None:
    from . import evaluate, pipeline
    from .config import CMoEConfig
    from .summary import layer_table, render, summary_table

    demo = args.model is None
    if demo:
        console.print("[bold]cmoe demo[/]: SmolLM2-135M-Instruct, calibration on the wiki sample, "
                      f"{args.config}, then dense vs converted perplexity")
    eval_sources = _csv(args.eval if args.eval is not None else ("wiki,c4" if demo else ""))
    algo = {k: getattr(args, k) for k in ("recipe", "router", "features", "ridge", "refit", "refit_ridge", "refit_stream", "allocation", "budget", "min_active",
                                           "max_active", "kmeans_iters") if getattr(args, k) is not None}
    cfg = CMoEConfig.parse(
        args.config, k_act=args.k_act, calib_samples=args.samples, calib_seqlen=args.seqlen, seed=args.seed, **algo
    )
    t0 = time.perf_counter()
    result = pipeline.convert(
        args.model or "smollm2", cfg, calib=args.calib, out=args.out, overwrite=args.overwrite,
        device=args.device, dtype=args.dtype, keep_dense=bool(eval_sources),
    )
    report = result.report
    console.print(render(layer_table(result.model, report.to_dict())))
    console.print(render(summary_table(result.model)))
    console.print(f"converted in {report.seconds:.1f} s (total {time.perf_counter() - t0:.1f} s with loading), "
                  f"peak memory {report.peak_memory_bytes / 2**30:.2f} GiB")
    if args.out:
        console.print(f"saved to {args.out}")
    if eval_sources:
        models = {"dense": result.dense, cfg.name: result.model}
        ppl = evaluate.compare_perplexity(models, result.tokenizer, eval_sources, seqlen=args.seqlen,
                                          max_windows=args.eval_windows)
        console.print(evaluate.format_table(ppl, title=f"held-out perplexity ({args.eval_windows} x {args.seqlen} tokens)"))
    if demo:
        for name, m in models.items():
            console.print(f"[bold]{name}[/]: {DEMO_PROMPT}{pipeline.sample_text(m, result.tokenizer, DEMO_PROMPT)}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and multiple-choice accuracy) of one or more models side by side",
                       description="Evaluate models on the same held-out windows. Each MODEL is a cmoe "
                       "checkpoint, a dense model folder, a hub id, a .gguf file or 'smollm2'.")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_DIR")
    p.add_argument("--data", default="wiki,c4", help="perplexity sources, comma-separated (default wiki,c4; '' for none)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="max windows per source (default: all)")
    p.add_argument("--tasks", default="", help="multiple-choice tasks: social_iqa, a .jsonl or BIG-bench task.json, lm-eval:NAME")
    p.add_argument("--limit", type=int, default=None, help="max items per task")
    p.add_argument("--base", action="store_true", help="also evaluate the dense model a checkpoint was converted from")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    from . import evaluate
    from .loading import load_model

    models, tokenizer = {}, None
    names = list(args.models)
    for name in list(names):
        model, tok = load_model(name, dtype=args.dtype, device=args.device)
        models[name] = model
        tokenizer = tokenizer or tok
        base = (getattr(model.config, "cmoe", None) or {}).get("source", {}).get("model")
        if args.base and base and base not in models:
            models = {base: load_model(base, dtype=args.dtype, device=args.device)[0], **models}
    results: dict = {}
    sources = _csv(args.data)
    if sources:
        results["perplexity"] = evaluate.compare_perplexity(models, tokenizer, sources, args.seqlen, args.windows)
        console.print(evaluate.format_table(results["perplexity"]))
    tasks = _csv(args.tasks)
    if tasks:
        from .tasks import format_results, run_tasks

        results["tasks"] = {n: run_tasks(m, tokenizer, tasks, limit=args.limit) for n, m in models.items()}
        console.print(format_results(results["tasks"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="experts, sizes and activated fractions of a cmoe checkpoint")
    p.add_argument("path", metavar="DIR")
    p.add_argument("--plot", metavar="PNG", help="save a bar chart of the per-layer allocation to this PNG file")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> None:
    from . import checkpoint
    from .pipeline import REPORT_FILE
    from .summary import layer_table, render, summary_table

    model = checkpoint.load(args.path)
    report_path = Path(args.path) / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    cfg = model.config.cmoe
    c = cfg["config"]
    console.print(f"{args.path}: {model.config.model_type}, {c['shared']}/{c['active']}/"
                  f"{c['experts']} (shared/active/experts), source {cfg.get('source', {})}, recipe {c.get('recipe', 'paper')}"
                  + (f", budget {c['budget']}" if c.get("budget") is not None else "")
                  + (f", allocation {c['allocation']}" if c.get("allocation") else ""))
    console.print(render(layer_table(model, report)))
    console.print(render(summary_table(model)))
    if args.plot:
        from .allocation import plot_allocation

        console.print(f"allocation plot saved to {plot_allocation(cfg['layers'], args.plot, title=str(args.path))}")


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="LoRA fine-tuning of a cmoe checkpoint with the differentiable router; saves the merged model",
        description="Recover quality lost by the conversion (method.md section 6): LoRA (r=8, alpha=32) on "
        "q/k/v/o, the shared expert and every routed expert, the router scale v at its own learning rate, "
        "and the load-balancing bias updated after each step. The LoRA is merged and the result saved to "
        "--out as an ordinary cmoe checkpoint. A resumable state is kept next to --out (OUT.ft-state) "
        "every --save-every steps; --resume continues an interrupted run from it.",
    )
    p.add_argument("path", metavar="DIR", help="a cmoe checkpoint (cmoe convert --out DIR)")
    p.add_argument("--data", default="wiki", help="training text: wiki, c4, ptb, a+b mixtures, hf:NAME, file (calib split)")
    p.add_argument("--samples", type=int, default=2048, help="training sequences (default 2048)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--out", required=True, help="output folder for the fine-tuned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--lr", type=float, help="LoRA learning rate (default 5.6e-5)")
    p.add_argument("--router-lr", type=float, help="learning rate of the router scale v (default 1e-3)")
    p.add_argument("--gamma", type=float, help="load-balancing bias step per optimizer step (default 1e-3; 0: off)")
    p.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default 1)")
    p.add_argument("--grad-accum", type=int, help="forwards per optimizer step (default 1)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout on attention and shared expert (default 0.1)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute activations in backward")
    p.add_argument("--save-every", type=int, help="optimizer steps between resumable states (default 100; 0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the state saved next to --out")
    p.add_argument("--seed", type=int, help="data order, LoRA init and dropout (default 0)")
    p.add_argument("--device", help="training device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="weights: bfloat16 on cuda, float32 on cpu by default")
    p.add_argument("--eval", default="", help="then perplexity before vs after on these sources (e.g. wiki,c4,ptb)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows per source (default 8)")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> None:
    from . import evaluate
    from .finetune import FinetuneConfig, finetune
    from .loading import load_model

    names = ["lr", "router_lr", "gamma", "epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha",
             "lora_dropout", "grad_checkpointing", "save_every", "seed"]
    cfg = FinetuneConfig(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    result = finetune(args.path, data=args.data, samples=args.samples, seqlen=args.seqlen, out=args.out,
                      config=cfg, resume=args.resume, overwrite=args.overwrite, device=args.device, dtype=args.dtype)
    r = result.report
    console.print(f"fine-tuned {r.steps} steps ({r.tokens:,} tokens, {r.trainable_parameters:,} trainable parameters) "
                  f"in {r.seconds:.1f} s" + (f", resumed from step {r.resumed_from}" if r.resumed_from else ""))
    if r.losses:
        console.print(f"training loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}, "
                      f"expert-load imbalance (max/mean) {r.imbalance[0]:.2f} -> {r.imbalance[-1]:.2f}")
    console.print(f"saved to {result.out}")
    sources = _csv(args.eval)
    if sources:
        ref = next(result.model.parameters())  # evaluate both where and as the fine-tuned model is
        before = load_model(args.path, dtype=ref.dtype, device=str(ref.device))[0]
        models = {Path(args.path).name: before, Path(args.out).name: result.model}
        ppl = evaluate.compare_perplexity(models, result.tokenizer, sources, seqlen=args.seqlen,
                                          max_windows=args.eval_windows)
        console.print(evaluate.format_table(ppl, title=f"held-out perplexity ({args.eval_windows} x {args.seqlen} tokens)"))


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the compiled static-cache path (dense or converted)",
                       description="Greedy or sampled generation through cmoe.generation: static KV cache, the "
                       "decode step compiled with CUDA graphs on a GPU (--no-compile on the CPU is fastest to start).")
    p.add_argument("model", metavar="MODEL_OR_DIR", help="cmoe checkpoint, dense folder, hub id, .gguf or 'smollm2'")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    import torch

    from .generation import generate
    from .loading import load_model

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, compile=not args.no_compile,
                   eos_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    console.print(args.prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    console.print(f"[dim]{new} tokens in {seconds:.2f} s ({new / seconds:.1f} tok/s, compile time included)[/]")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="the GPU speed table: dense vs CMoE, prefill and decode (see cmoe.bench)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of cmoe.bench (--help for them)")


COMMANDS = [_add_convert, _add_eval, _add_inspect, _add_generate, _add_bench, _add_finetune]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmoe", description="Convert dense LLMs into CMoE mixtures of experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every option belongs to cmoe.bench, --help included
        from .bench import main as bench_main

        return bench_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    from .analysis import CalibrationError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .families import UnsupportedModelError
    from .loading import ModelLoadError

    try:
        args.func(args)
    except (CalibrationError, ConfigError, CheckpointError, DataError, UnsupportedModelError, ModelLoadError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
