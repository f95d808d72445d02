"""A/B of settings on the compiled decode step (or, with ``--prefill BxS``, the compiled prefill
forward), dense and converted models alike, in one process.

    python benchmarks/bench_ab.py --models llama2-7b --configs S2A2E16 S1A1E8 --batch 1 --rounds 2 \\
        --arm default \\
        --arm "cd: torch._inductor.config.coordinate_descent_tuning = True" \\
        --arm "down: cmoe.triton_experts.GEMV_CONFIG['down'] = (4, 512, 2)"

An arm is ``NAME`` or ``NAME: TARGET = VALUE; TARGET = VALUE ...``: each TARGET a module attribute
(``package.module.attr``) or an item of one (``package.module.attr['key']``), each VALUE a Python
literal. The arms run in turn in every round (in reverse order in odd rounds, so that drift over
the run does not favour one), each with its settings applied and then put back. Every model's
decode step is captured again for every arm (its static cache dropped), so settings read while the
step is captured (kernel tiles) take effect; arms that set anything under ``torch._inductor`` or
``torch._dynamo`` also recompile it (``--recompile``: every arm). Module globals read while the
step is traced need no recompile: dynamo guards on them and retraces when they change. Models:
LLaMA shapes with random bf16 weights (``cmoe.bench``), converted with ``cmoe.convert_`` on random
calibration tokens.

With ``--prefill BxS`` each cell is one prefill forward of B random sequences of S tokens, timed as
``bench_speed.py`` times it (compiled with ``fullgraph=True``, q/k/v as one GEMM, SDPA's causal
kernel, replayed as a CUDA graph; the mean over a block of about 0.5 s and at least ``--repeats``
replays, after 0.3 s of untimed ones: ``cmoe.generation.block_time``), instead of decode steps:

    python benchmarks/bench_ab.py --models llama2-7b --configs S1A1E8 --prefill 1x2048 --rounds 3 --recompile \
        --arm default --arm "fold: cmoe.triton_experts.SHARED_FOLD_MAX_TOKENS = 4096"

A decode step's time is ``cmoe.generation.time_decode``'s steady rate: passes of ``--steps`` steps over
the same positions after one prefill, 0.3 s of them untimed, then the mean over a block of about 0.5 s
and at least ``--repeats`` passes.

Prints the hardware, one line per (round, arm), then the median over rounds per arm: the time of a
decode step (or prefill) of each model and each converted model's ratio to dense in the same arm.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cmoe import bench

RECOMPILE_PREFIXES = ("torch._inductor", "torch._dynamo")
_TARGET = re.compile(r"^([A-Za-z_][\w.]*?)\.([A-Za-z_]\w*)(\[(.+)\])?$")


@dataclass
class Setting:
    module: str  # an importable module, e.g. "cmoe.triton_experts" or "torch._inductor.config"
    attr: str
    key: object  # None: the attribute itself; else an item of it
    value: object


@dataclass
class Arm:
    name: str
    settings: list[Setting]

    @property
    def recompiles(self) -> bool:
        return any(s.module.startswith(RECOMPILE_PREFIXES) for s in self.settings)


def _split_target(target: str) -> tuple[str, str, object]:
    """"a.b.c['k']" -> ("a.b", "c", "k"): the longest importable prefix is the module."""
    m = _TARGET.match(target.strip())
    if not m:
        raise ValueError(f"bad setting target {target!r}: expected package.module.attr or package.module.attr['key']")
    path, attr, key = m.group(1), m.group(2), m.group(4)
    parts = f"{path}.{attr}".split(".")
    for i in range(len(parts) - 1, 0, -1):  # torch._inductor.config.triton.multi_kernel: module torch._inductor.config
        try:
            importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        # the attribute may be nested (inductor's triton.*): _get and _set walk its dots
        return ".".join(parts[:i]), ".".join(parts[i:]), (None if key is None else ast.literal_eval(key))
    raise ValueError(f"no importable module in setting target {target!r}")


def parse_arm(text: str) -> Arm:
    """``NAME`` or ``NAME: TARGET = VALUE; ...`` -> Arm."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"arm {text!r} has no name")
    settings = []
    for part in filter(str.strip, rest.split(";")):
        target, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"setting {part.strip()!r} of arm {name!r} has no '= VALUE'")
        module, attr, key = _split_target(target)
        try:
            settings.append(Setting(module, attr, key, ast.literal_eval(value.strip())))
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"value {value.strip()!r} of arm {name!r} is not a Python literal") from e
    return Arm(name, settings)


def _get(obj, attr: str):
    for a in attr.split("."):
        obj = getattr(obj, a)
    return obj


def _set(obj, attr: str, value) -> None:
    *head, last = attr.split(".")
    for a in head:
        obj = getattr(obj, a)
    setattr(obj, last, value)


@contextmanager
def applied(arm: Arm):
    """The arm's settings in effect, then put back (in reverse order), whatever happens inside."""
    undo = []
    try:
        for s in arm.settings:
            mod = importlib.import_module(s.module)
            old = _get(mod, s.attr)
            # an item: set in a new dict, not the old one mutated, so that the old dict stays as it was
            _set(mod, s.attr, s.value if s.key is None else {**old, s.key: s.value})
            undo.append(lambda mod=mod, s=s, old=old: _set(mod, s.attr, old))
        yield
    finally:
        for fn in reversed(undo):
            fn()


def summary(results: dict, arms: list[Arm], models: list[str]) -> str:
    """Markdown table: median step time (ms) over rounds per (arm, model), and each converted
    model's ratio to dense in the same arm (medians of the per-round ratios)."""
    configs = [m for m in models if m != "dense"]
    head = "| arm | dense (ms) | " + " | ".join(f"{c} (ms) | {c} vs dense" for c in configs) + " |"
    lines = [head, "| " + " | ".join(["---"] * (2 + 2 * len(configs))) + " |"]
    for arm in arms:
        runs = results[arm.name]  # list of {model: ms}
        cells = [f"{statistics.median(r['dense'] for r in runs):.4f}"]
        for c in configs:
            cells.append(f"{statistics.median(r[c] for r in runs):.4f}")
            cells.append(f"{statistics.median(r['dense'] / r[c] for r in runs):.4f}x")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def prefill_ms(model, shape: tuple[int, int], repeats: int) -> float:
    """One compiled prefill forward of ``shape`` (B, S) random tokens (seeded: the same ids for every
    model and arm), timed as ``bench_speed.py`` times it; milliseconds."""
    from cmoe.attention import unpadded_prefill
    from cmoe.fused_qkv import fused_qkv

    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, shape, device="cuda", generator=gen)
    with unpadded_prefill(), fused_qkv(model):
        t, _ = bench.time_prefill(bench.prefill_forward(model, ids), repeats=repeats)
    torch.cuda.empty_cache()
    return t * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama2-7b"], choices=list(bench.MODELS), help="model shapes")
    p.add_argument("--configs", nargs="+", default=["S2A2E16"], help="CMoE configurations, each timed against dense")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="decode batch sizes, each timed in turn with the same models")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=32, help="decode steps per pass (over the same positions)")
    p.add_argument("--repeats", type=int, default=3, help="decode: timed passes, at least; prefill: timed replays, at least")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prefill", metavar="BxS", type=bench.shape_arg, help="time a prefill forward of B x S tokens instead of decode steps")
    p.add_argument("--recompile", action="store_true", help="recompile the decode step (or prefill) for every arm")
    p.add_argument("--arm", action="append", required=True, help="NAME or 'NAME: TARGET = VALUE; ...' (repeat the option)")
    args = p.parse_args(argv)
    arms = [parse_arm(a) for a in args.arm]
    if len({a.name for a in arms}) < len(arms):
        p.error("arm names must differ")
    if not torch.cuda.is_available():
        print("bench_ab needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton

    from cmoe.generation import drop_static_caches, time_decode

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}", flush=True)
    print(f"# command: python benchmarks/bench_ab.py {' '.join(argv if argv is not None else sys.argv[1:])}", flush=True)

    def step_ms(model, batch: int) -> float:
        if args.prefill:
            return prefill_ms(model, args.prefill, args.repeats)
        drop_static_caches(model)  # captured again under this arm's settings
        torch.cuda.empty_cache()
        return time_decode(model, batch, args.prompt, steps=args.steps, min_passes=args.repeats) * 1e3

    for shape in args.models:
        models = {"dense": bench.build_dense(shape, layers=args.layers)}
        for config in args.configs:
            t0 = time.perf_counter()
            models[config] = bench.build_dense(shape, layers=args.layers)
            bench.convert_model_(models[config], config)
            print(f"# {shape} {config}: converted in {time.perf_counter() - t0:.0f} s", flush=True)
        for batch in [None] if args.prefill else args.batch:
            cell = f"prefill {args.prefill[0]}x{args.prefill[1]}" if args.prefill else f"b={batch}"
            results = {a.name: [] for a in arms}
            for rnd in range(args.rounds):
                for arm in arms if rnd % 2 == 0 else arms[::-1]:
                    t0 = time.perf_counter()
                    with applied(arm):
                        if arm.recompiles or args.recompile:
                            torch._dynamo.reset()
                        times = {name: step_ms(m, batch) for name, m in models.items()}
                    if arm.recompiles or args.recompile:
                        torch._dynamo.reset()  # the next arm compiles without this one's settings
                    results[arm.name].append(times)
                    cells = " ".join(f"{n} {ms:.4f} ms ({times['dense'] / ms:.4f}x)" for n, ms in times.items() if n != "dense")
                    print(f"{shape} {cell} round {rnd} {arm.name}: dense {times['dense']:.4f} ms {cells} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
            print(f"\n{shape}, {cell}, {args.layers} layers, median over {args.rounds} rounds:\n")
            print(summary(results, arms, list(models)), flush=True)
            for m in models.values():
                drop_static_caches(m)
        del models
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
