"""How much of the conversion's loss a short LoRA fine-tune recovers (method.md section 6).

    python benchmarks/finetune_recovery.py                                    # the full run (GPU)
    python benchmarks/finetune_recovery.py --samples 64 --seqlen 512 --task-limit 300   # CPU-sized

For each CMoE configuration: convert SmolLM2-135M-Instruct training-free (calibration 8 x 2048
wiki tokens), fine-tune it (``cmoe.finetune.finetune_ids``: LoRA r=8 on q/k/v/o, shared and
routed experts, router scale v, load-balancing bias) on ``--samples`` windows of ``--seqlen``
tokens of the wiki calibration split (other windows than the conversion's), then measure,
for dense, training-free and fine-tuned alike:

- held-out perplexity on wiki, c4, ptb (8 windows of 2048 tokens, ``cmoe.evaluate.perplexity``),
- the recovery (PPL_free - PPL_ft) / (PPL_free - PPL_dense) per source (1 = back to dense),
- social_iqa zero-shot acc_norm (``cmoe.tasks``, lm-eval's definition),
- the wall time of the conversion and of the fine-tune.

All three models are evaluated in the same dtype on the same device: float32 on the CPU,
bfloat16 on CUDA (the fine-tune trains bf16 weights there).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import cmoe
from cmoe import data, evaluate
from cmoe.tasks import run_tasks
from cmoe import finetune as ft


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def measure(model, tok, windows: dict, tasks: list[str], task_limit, name: str, task_batch: int = 32) -> dict:
    out = {"ppl": {s: evaluate.perplexity(model, w, desc=f"{name} {s}") for s, w in windows.items()}}
    if tasks:
        out["tasks"] = run_tasks(model, tok, tasks, limit=task_limit, batch_size=task_batch)
    return out


def show(name: str, r: dict) -> None:
    """Print one model's numbers as soon as they are measured (a long run keeps what it did)."""
    ppl = ", ".join(f"{s} {v:.2f}" for s, v in r["ppl"].items())
    acc = ", ".join(f"{t} acc_norm {100 * m['acc_norm']:.1f} +- {100 * m['acc_norm_stderr']:.1f}"
                    for t, m in r.get("tasks", {}).items())
    print(f"{name}: {ppl}" + (f"; {acc}" if acc else "") + (f" ({r['seconds_label']})" if r.get("seconds_label") else ""),
          flush=True)


def recovery(free: float, ft_: float, dense: float) -> float:
    return (free - ft_) / (free - dense) if free != dense else float("nan")


def table(results: dict, sources: list[str], tasks: list[str]) -> str:
    head = ["model", *[f"{s} PPL" for s in sources], *[f"{t} acc_norm %" for t in tasks], "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["models"].items():
        cells = [name, *[f"{r['ppl'][s]:.2f}" for s in sources]]
        for t in tasks:
            m = r.get("tasks", {}).get(t)
            cells.append(f"{100 * m['acc_norm']:.1f} ± {100 * m['acc_norm_stderr']:.1f}" if m else "-")
        cells.append(r.get("seconds_label", ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| config | " + " | ".join(f"recovery {s}" for s in sources) + " |",
              "|" + "---|" * (1 + len(sources))]
    for cfg, rec in results["recovery"].items():
        lines.append(f"| {cfg} | " + " | ".join(f"{100 * rec[s]:.1f} %" for s in sources) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="dense model: hub id, folder, .gguf, or 'smollm2'")
    p.add_argument("--configs", default="S1A1E8,S2A2E8")
    p.add_argument("--recipe", default=None, help="conversion recipe: paper, plus (default: the library's)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--data", default="wiki", help="fine-tuning text (calibration split)")
    p.add_argument("--samples", type=int, default=2048, help="fine-tuning sequences")
    p.add_argument("--seqlen", type=int, default=2048, help="fine-tuning tokens per sequence")
    p.add_argument("--data-seed", type=int, default=1, help="fine-tuning windows (the conversion draws seed 0)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5.6e-5)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--eval", default="wiki,c4,ptb")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--tasks", default="social_iqa", help="multiple-choice tasks via cmoe.tasks ('' for none)")
    p.add_argument("--task-batch-size", type=int, default=32, help="sequences per forward when scoring tasks")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--convert-device", default=None, help="where convert_ computes each layer (default: --device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="write all numbers to this file")
    p.add_argument("--save-dir", help="save the fine-tuned checkpoints here (SAVE_DIR/CONFIG-ft)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = ft.default_dtype(device)
    sources = [s for s in args.eval.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{started:%Y-%m-%d %H:%M} UTC, {machine(device)}")

    dense, tok = cmoe.load_model(args.model, dtype="float32")
    windows = {s: data.eval_windows(tok, s, args.eval_seqlen, args.eval_windows) for s in sources}
    calib = data.calibration_tokens(tok, "wiki", args.calib_samples, args.calib_seqlen, seed=0)
    train = data.calibration_tokens(tok, args.data, args.samples, args.seqlen, seed=args.data_seed)
    fcfg = ft.FinetuneConfig(lr=args.lr, router_lr=args.router_lr, gamma=args.gamma, epochs=args.epochs,
                             batch_size=args.batch_size, grad_accum=args.grad_accum,
                             grad_checkpointing=args.grad_checkpointing)
    results = {"settings": vars(args), "machine": machine(device), "date": started.isoformat(), "models": {},
               "recovery": {}, "finetune": {}}
    dense_eval = copy.deepcopy(dense).to(device, dtype)
    results["models"]["dense"] = measure(dense_eval, tok, windows, tasks, args.task_limit, "dense", args.task_batch_size)
    show("dense", results["models"]["dense"])
    del dense_eval
    for name in args.configs.split(","):
        model = copy.deepcopy(dense)  # float32, on the CPU: convert_ moves one layer at a time to the device
        recipe = {"recipe": args.recipe} if args.recipe else {}
        cfg = cmoe.CMoEConfig.parse(name, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, **recipe)
        t0 = time.perf_counter()
        cmoe.convert_(model, cfg, calib, device=args.convert_device or device)
        convert_s = time.perf_counter() - t0
        free = measure(model.to(device, dtype), tok, windows, tasks, args.task_limit, f"{name} free", args.task_batch_size)
        free["seconds_label"] = f"convert {convert_s:.0f}"
        results["models"][f"{name} training-free"] = free
        show(f"{name} training-free", free)
        report = ft.finetune_ids(model, train, fcfg, device=device, dtype=dtype)
        tuned = measure(model, tok, windows, tasks, args.task_limit, f"{name} ft", args.task_batch_size)
        tuned["seconds_label"] = f"finetune {report.seconds:.0f}"
        results["models"][f"{name} fine-tuned"] = tuned
        show(f"{name} fine-tuned", tuned)
        results["finetune"][name] = {"seconds": report.seconds, "steps": report.steps, "tokens": report.tokens,
                                     "trainable_parameters": report.trainable_parameters,
                                     "loss_first": report.losses[0], "loss_last": report.losses[-1],
                                     "imbalance_first": report.imbalance[0], "imbalance_last": report.imbalance[-1],
                                     "convert_seconds": convert_s}
        results["recovery"][name] = {
            s: recovery(free["ppl"][s], tuned["ppl"][s], results["models"]["dense"]["ppl"][s]) for s in sources
        }
        if args.save_dir:
            cmoe.save(model, Path(args.save_dir) / f"{name}-ft", tokenizer=tok, overwrite=True)
        del model

    print()
    print(table(results, sources, tasks))
    for name, f in results["finetune"].items():
        print(f"{name}: {f['steps']} steps, {f['tokens']:,} tokens, {f['trainable_parameters']:,} trainable, "
              f"{f['seconds']:.0f} s; loss {f['loss_first']:.3f} -> {f['loss_last']:.3f}, "
              f"load imbalance {f['imbalance_first']:.2f} -> {f['imbalance_last']:.2f}")
    print(f"\nconversion recipe: {args.recipe or cmoe.CMoEConfig().recipe}; "
          f"fine-tune: {args.samples} x {args.seqlen} tokens of {args.data}, batch {args.batch_size} x "
          f"accum {args.grad_accum}, lr {args.lr}, router lr {args.router_lr}, gamma {args.gamma}; eval "
          f"{args.eval_windows} x {args.eval_seqlen} tokens; {results['machine']}; {dtype}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
