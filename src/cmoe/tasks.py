"""Downstream accuracy: multiple-choice scoring by log-likelihood, as lm-evaluation-harness does.

A task is a list of :class:`MCItem`. Each choice is scored by the summed log-probability of
its tokens given the context; the model "answers" with the highest score.

- ``acc``: argmax of the log-likelihoods equals the answer.
- ``acc_norm``: argmax of log-likelihood / ``len(choice)`` (characters of the choice text,
  without the leading space) equals the answer.
- ``*_stderr``: standard error of the mean, ``sqrt(p (1 - p) / (n - 1))``.

These are lm-eval's definitions (``acc``, ``acc_norm`` of ``output_type: multiple_choice``
and ``mean_stderr``), and the tokenisation is HFLM's: the context's trailing whitespace
moves onto the continuation, ``context + continuation`` is encoded as a whole with no
special tokens and split at the length of the encoded context; an empty context becomes
the BOS (else EOS) token. Ties go to the first choice (``np.argmax``).

Tasks come from local files (:data:`FORMATS`: ``jsonl``, BIG-bench ``task.json``), from
built-in names (:data:`BUILTIN_TASKS`, e.g. ``social_iqa``), or from lm-evaluation-harness
(``lm-eval:NAME``, optional dependency, online)::

    results = run_tasks(model, tokenizer, ["social_iqa", "my_task.jsonl"])
    rich.print(format_results({"dense": dense_results, "S3A3E8": moe_results}))
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "BUILTIN_TASKS",
    "FORMATS",
    "LM_EVAL_PREFIX",
    "MCItem",
    "TaskError",
    "evaluate_mc",
    "format_results",
    "load_task",
    "loglikelihood",
    "mc_metrics",
    "mean_stderr",
    "register_format",
    "run_tasks",
]

TASK_DATA = Path(__file__).parent / "task_data"
BUILTIN_TASKS: dict[str, Path] = {
    "social_iqa": TASK_DATA / "bigbench" / "social_iqa" / "task.json",  # 1,954 items, 2-3 choices
}
LM_EVAL_PREFIX = "lm-eval:"


class TaskError(ValueError):
    """A task cannot be loaded or run; the message says why and what is supported."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: each ``continuation(j)`` is scored after ``context``."""

    context: str
    choices: list[str]
    answer: int  # index into choices
    delimiter: str = " "  # between context and choice, lm-eval's target_delimiter

    def __post_init__(self):
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise TaskError(f"item needs non-empty string choices: {self.context[:80]!r}")
        if not 0 <= self.answer < len(self.choices):
            raise TaskError(f"answer {self.answer} out of range for {len(self.choices)} choices")

    def continuation(self, j: int) -> str:
        return self.delimiter + self.choices[j]


# ---------------------------------------------------------------------------------------
# Loaders: a registry of file formats.


@dataclass(frozen=True)
class TaskFormat:
    name: str
    suffixes: tuple[str, ...]
    load: Callable[[Path], list[MCItem]]
    description: str


FORMATS: dict[str, TaskFormat] = {}


def register_format(name: str, suffixes: Sequence[str], description: str):
    """Decorator: register ``load(path) -> list[MCItem]`` for files ending in ``suffixes``."""

    def deco(load: Callable[[Path], list[MCItem]]):
        FORMATS[name] = TaskFormat(name, tuple(suffixes), load, description)
        return load

    return deco


def _supported() -> str:
    fmts = "; ".join(f"{f.name} ({', '.join(f.suffixes)}): {f.description}" for f in FORMATS.values())
    return f"supported formats: {fmts}; built-in tasks: {', '.join(BUILTIN_TASKS)}; or lm-eval:NAME"


@register_format("jsonl", [".jsonl"], 'one {"question", "choices", "answer": int} object per line')
def load_jsonl(path: Path) -> list[MCItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                q, choices, answer = obj["question"], obj["choices"], obj["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TaskError(
                    f"{path}:{lineno}: expected a JSON object with question, choices, answer ({e!r})"
                ) from None
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise TaskError(f"{path}:{lineno}: choices must be a list of strings")
            if isinstance(answer, bool) or not isinstance(answer, int):
                raise TaskError(f"{path}:{lineno}: answer must be an integer index, got {answer!r}")
            try:
                items.append(MCItem(str(q).rstrip(), choices, answer))
            except TaskError as e:
                raise TaskError(f"{path}:{lineno}: {e}") from None
    return items


@register_format("bigbench", [".json"], "BIG-bench task.json with examples[i] = {input, target_scores}")
def load_bigbench(path: Path) -> list[MCItem]:
    """BIG-bench JSON task, scored cloze-style like lm-eval.

    context = ``task_prefix + input`` with trailing whitespace stripped; continuation =
    ``" " + choice``; answer = the choice with the highest target score (first on ties).
    BIG-bench's own Q:/A: prefixes and appended choice lists are not used.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        examples = data["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TaskError(f"{path}: not a BIG-bench task.json with an 'examples' list ({e!r})") from None
    prefix = str(data.get("task_prefix", ""))
    items = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not scores or "input" not in ex:
            raise TaskError(
                f"{path}: example {i} has no input/target_scores; only multiple-choice BIG-bench tasks are supported"
            )
        choices = list(scores)
        answer = int(np.argmax([float(s) for s in scores.values()]))
        items.append(MCItem((prefix + ex["input"]).rstrip(), choices, answer))
    return items


def _resolve(task: str | Path) -> Path:
    if str(task) in BUILTIN_TASKS:
        return BUILTIN_TASKS[str(task)]
    path = Path(task)
    if not path.is_file():
        raise TaskError(f"no task file or built-in task named {str(task)!r}; {_supported()}")
    return path


def load_task(task: str | Path, format: str | None = None) -> list[MCItem]:
    """Load a task from a built-in name or a local file; ``format`` overrides the suffix."""
    path = _resolve(task)
    if format is not None:
        if format not in FORMATS:
            raise TaskError(f"unknown task format {format!r}; {_supported()}")
        fmt = FORMATS[format]
    else:
        by_suffix = {s: f for f in FORMATS.values() for s in f.suffixes}
        fmt = by_suffix.get(path.suffix.lower())
        if fmt is None:
            raise TaskError(f"unknown task file format {path.name!r}; {_supported()}")
    items = fmt.load(path)
    if not items:
        raise TaskError(f"{path}: no items")
    return items


# ---------------------------------------------------------------------------------------
# Scoring.


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM's split: trailing context whitespace joins the continuation; encode the whole."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def _max_length(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else min(int(getattr(tokenizer, "model_max_length", 2048)), 1 << 20)


def _pad(rows: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right- (or left-) pad to ``[B, T]`` ids and a 0/1 mask."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _sum_logprobs(logits: torch.Tensor, starts: list[int], targets: list[list[int]]) -> list[float]:
    """sum_j log_softmax(logits[r, starts[r] + j])[targets[r][j]] for each row r."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    out = []
    for r, (s, tgt) in enumerate(zip(starts, targets)):
        t = torch.tensor(tgt, device=logp.device)
        out.append(logp[r, s : s + len(t)].gather(-1, t[:, None]).sum().item())
    return out


def _plain_batch(model, batch, pad, device, keep_ok) -> list[float]:
    """lm-eval's way: each row is its own ``(context + continuation)[:-1]``."""
    inps = [inp for inp, _ in batch]
    ids, mask = _pad(inps, pad)
    T = ids.shape[1]
    # continuation j of a row is predicted at position len(inp) - len(cont) + j
    starts = [len(inp) - len(cont) for inp, cont in batch]
    kwargs = {"logits_to_keep": T - min(starts)} if keep_ok else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
    off = T - logits.shape[1]  # logits[:, k] is position off + k
    return _sum_logprobs(logits, [s - off for s in starts], [cont for _, cont in batch])


def _cache_kwarg(model) -> str:
    # transformers >= 5.2x calls it `cache`, earlier releases `past_key_values`
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _shared_batch(model, groups, pad, device) -> list[float]:
    """Choices sharing a context: run ``context[:-1]`` once, then every choice's
    ``[context[-1]] + continuation[:-1]`` on a copy of its KV cache.

    Same inputs, positions and attention as :func:`_plain_batch`, ~2x fewer tokens on a
    3-choice task with short answers. Prefixes are left-padded so that every row's real
    tokens end where its continuation starts: cache-index distances are then true token
    distances, which sliding-window attention (Gemma, Mistral) relies on.
    """
    prefixes = [ctx[:-1] for ctx, _ in groups]  # every ctx has >= 2 tokens
    ids, pmask = _pad(prefixes, pad, left=True)  # [G, P]
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids.to(device),
        attention_mask=pmask.to(device),
        position_ids=ppos.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    rows = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [cont for _, cs in groups for cont in cs]
    cache.batch_select_indices(torch.tensor(rows, device=device))  # [G, ...] -> [R, ...]
    suffixes = [[groups[g][0][-1]] + cont[:-1] for g, cont in zip(rows, conts)]
    sids, smask = _pad(suffixes, pad)
    plen = torch.tensor([len(prefixes[g]) for g in rows])
    pos = plen[:, None] + torch.arange(sids.shape[1])  # [R, S], after each row's own prefix
    mask = torch.cat([pmask[rows], smask], dim=1)  # [R, P + S]
    logits = model(
        input_ids=sids.to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        **{_cache_kwarg(model): cache},
    ).logits
    return _sum_logprobs(logits, [0] * len(conts), conts)


@torch.inference_mode()
def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = True,
    share_context: bool = True,
) -> list[float]:
    """Sum of log P(continuation tokens | context) for each ``(context, continuation)``.

    As HFLM: the model sees ``(context + continuation)[-(max_length + 1):][:-1]``, batches
    are right-padded (padding sits after every real token, so the causal model's real
    positions do not see it) and sorted longest first. With ``share_context``, requests
    whose encoded contexts are equal (the choices of one question) run the context once
    and reuse its KV cache; the result is the same up to float rounding.
    ``batch_size`` counts sequences (choices) per forward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    max_len = _max_length(model, tokenizer)
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plain, shared = [], {}  # plain: [(index, inp, cont)]; shared: ctx -> [(index, cont)]
    for i, (ctx, cont) in enumerate(requests):
        c_ids, x_ids = _encode_pair(tokenizer, ctx, cont)
        if not x_ids:
            raise TaskError(f"continuation {cont!r} encodes to no tokens")
        if len(x_ids) > max_len:
            raise TaskError(f"continuation of {len(x_ids)} tokens exceeds the model's {max_len}")
        if share_context and keep_ok and len(c_ids) >= 2 and len(c_ids) + len(x_ids) <= max_len + 1:
            shared.setdefault(tuple(c_ids), []).append((i, x_ids))
        else:
            plain.append((i, (c_ids + x_ids)[-(max_len + 1) :][:-1], x_ids))
    out = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", unit="req", disable=not progress)

    plain.sort(key=lambda r: -len(r[1]))
    for b in range(0, len(plain), batch_size):
        chunk = plain[b : b + batch_size]
        lls = _plain_batch(model, [(inp, cont) for _, inp, cont in chunk], pad, device, keep_ok)
        for (i, _, _), ll in zip(chunk, lls):
            out[i] = ll
        bar.update(len(chunk))

    groups = sorted(shared.items(), key=lambda g: -(len(g[0]) + max(len(c) for _, c in g[1])))
    k = 0
    while k < len(groups):
        take, n = [], 0  # whole groups, about batch_size continuations
        while k < len(groups) and (not take or n + len(groups[k][1]) <= batch_size):
            take.append(groups[k])
            n += len(groups[k][1])
            k += 1
        lls = _shared_batch(model, [(list(c), [x for _, x in rs]) for c, rs in take], pad, device)
        for (i, _), ll in zip((r for _, rs in take for r in rs), lls):
            out[i] = ll
        bar.update(n)
    bar.close()
    return out


def mean_stderr(x: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); NaN for n < 2."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    return float(np.std(x, ddof=1) / math.sqrt(len(x)))


def mc_metrics(lls: Sequence[Sequence[float]], items: Sequence[MCItem]) -> dict:
    """acc / acc_norm (± stderr) from per-choice log-likelihoods ``lls[i][j]``."""
    acc, acc_norm = [], []
    for ll, item in zip(lls, items, strict=True):
        ll = np.asarray(ll, dtype=np.float64)
        lens = np.array([float(len(c)) for c in item.choices])
        acc.append(float(np.argmax(ll) == item.answer))
        acc_norm.append(float(np.argmax(ll / lens) == item.answer))
    return {
        "acc": float(np.mean(acc)) if acc else float("nan"),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": float(np.mean(acc_norm)) if acc_norm else float("nan"),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "n": len(acc),
    }


def evaluate_mc(
    model,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Zero-shot multiple-choice accuracy of ``model`` on ``items`` (the first ``limit``).

    Returns ``{acc, acc_stderr, acc_norm, acc_norm_stderr, n}`` with lm-eval's definitions.
    """
    items = list(items)[:limit] if limit is not None else list(items)
    if not items:
        raise TaskError("no items to evaluate")
    requests = [(it.context, it.continuation(j)) for it in items for j in range(len(it.choices))]
    flat = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    lls, k = [], 0
    for it in items:
        lls.append(flat[k : k + len(it.choices)])
        k += len(it.choices)
    return mc_metrics(lls, items)


# ---------------------------------------------------------------------------------------
# Running named tasks; lm-evaluation-harness for users who are online.


def _require_lm_eval(task: str):
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise TaskError(
            f"task {task} needs lm-evaluation-harness: `pip install lm-eval` "
            "(or `pip install cmoe[online]`); it downloads its datasets, so it needs internet. "
            f"Offline, use local task files; {_supported()}"
        ) from None


def _lm_eval(model, tokenizer, name: str, batch_size: int, limit: int | None) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], limit=limit)
    res = out["results"][name]
    metrics = {
        key: res.get(f"{key},none", float("nan"))
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
    }
    metrics["n"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
    return metrics


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate each task: a local file, a built-in name, or ``lm-eval:NAME``.

    Every task is resolved and loaded (or lm-eval imported) before any model call, so a bad
    name fails fast. Returns ``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}``.
    """
    loaded = {}
    for t in tasks:
        if t.startswith(LM_EVAL_PREFIX):
            _require_lm_eval(t)
            loaded[t] = None
        else:
            loaded[t] = load_task(t)
    results = {}
    for task, items in loaded.items():
        if items is None:
            results[task] = _lm_eval(model, tokenizer, task[len(LM_EVAL_PREFIX) :], batch_size, limit)
        else:
            results[task] = evaluate_mc(model, tokenizer, items, batch_size, limit, progress)
    return results


def format_results(results_by_model: dict[str, dict[str, dict]], title: str = "Zero-shot accuracy"):
    """A rich table: per task, each model's acc_norm ± stderr and acc (percent).

    The first model is the reference (dense); later models get a Δ acc_norm column.
    """
    from rich.table import Table

    def pct(m: dict, key: str) -> str:
        v, se = m.get(key, float("nan")), m.get(f"{key}_stderr", float("nan"))
        return f"{100 * v:.1f} ± {100 * se:.1f}"

    names = list(results_by_model)
    table = Table(title=title)
    table.add_column("task")
    table.add_column("n", justify="right")
    for i, name in enumerate(names):
        table.add_column(f"{name}\nacc_norm %", justify="right")
        table.add_column(f"{name}\nacc %", justify="right")
        if i:
            table.add_column(f"Δ acc_norm\nvs {names[0]}", justify="right")
    tasks = list(dict.fromkeys(t for r in results_by_model.values() for t in r))
    for task in tasks:
        ref = results_by_model[names[0]].get(task)
        row = [task, str(next((r[task]["n"] for r in results_by_model.values() if task in r), ""))]
        for i, name in enumerate(names):
            m = results_by_model[name].get(task)
            if m is None:
                row += ["–", "–"] + (["–"] if i else [])
                continue
            row += [pct(m, "acc_norm"), pct(m, "acc")]
            if i:
                row.append(f"{100 * (m['acc_norm'] - ref['acc_norm']):+.1f}" if ref else "–")
        table.add_row(*row)
    return table
